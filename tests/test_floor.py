"""The floor rule (kernels/floor.py): per shape class, the faster of the cpu kernel and the
dense composite, decided from timings of real calls; forced backends and the off and
deterministic modes bypass it."""
import pytest
import torch

import sparsekern as sk
from sparsekern.kernels import floor, registry
from sparsekern.kernels.floor import CONFIRM_AFTER, SAMPLES

from helpers import random_bsr

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def measuring(monkeypatch):
    floor.reset_floor()
    monkeypatch.setattr(floor, "_mode", "measure")
    yield
    floor.reset_floor()


@pytest.fixture
def toy(monkeypatch, measuring):
    """A product "toy" whose cpu kernel and composite cost what ``costs`` says on a fake clock."""
    now, costs, ran = [0.0], {"cpu": 1.0, "dense": 1.0}, []

    def side(name):
        def fn(x):
            now[0] += costs[name]
            ran.append(name)
            return x + 1
        return fn

    monkeypatch.setitem(registry._kernels, "toy", {})
    registry.register_kernel("toy", "dense", side("dense"))
    monkeypatch.setitem(floor._composites, "toy", ("dense", lambda x: (floor.tokens_bucket(x.shape[0]),),
                                                   lambda x: x.shape[0] == 1, lambda x: x.shape[0] == 2))
    monkeypatch.setattr(floor, "_clock", lambda: now[0])
    return side("cpu"), costs, ran


@pytest.mark.parametrize("kernel_cost,winner", [(2.0, "dense"), (0.5, "cpu"), (0.94, "cpu"), (0.97, "dense"),
                                                (1.0, "dense")])
def test_the_faster_side_is_kept_after_the_measured_calls(toy, kernel_cost, winner):
    kernel, costs, ran = toy
    costs["cpu"] = kernel_cost
    x = torch.zeros(5)
    for _ in range(2 * SAMPLES + 4):
        torch.testing.assert_close(floor.with_floor("toy", kernel, x)(x), x + 1)
    assert ran[:2 * SAMPLES] == ["cpu", "dense"] * SAMPLES   # alternating, the kernel first
    assert ran[2 * SAMPLES:] == [winner] * 4
    assert list(floor.floor_decisions().values()) == [winner]


def test_warm_up_timings_are_not_counted(toy):
    kernel, costs, ran = toy
    x = torch.zeros(5)
    for i in range(2 * SAMPLES):
        costs["cpu"] = 100.0 if i == 0 else 0.5   # only its first call is slow
        floor.with_floor("toy", kernel, x)(x)
    assert list(floor.floor_decisions().values()) == ["cpu"]


@pytest.mark.parametrize("later_dense_cost,final", [(0.4, "dense"), (1.2, "cpu")])
def test_a_kernel_choice_is_measured_again_and_the_second_round_decides(toy, later_dense_cost, final):
    kernel, costs, ran = toy
    x = torch.zeros(5)
    run = floor.with_floor("toy", kernel, x)
    costs["cpu"], costs["dense"] = 0.5, 1.0   # the composite slow on the process's first calls
    for _ in range(2 * SAMPLES):
        run(x)
    assert list(floor.floor_decisions().values()) == ["cpu"] and not floor.floor_settled()
    costs["dense"] = later_dense_cost
    for _ in range(CONFIRM_AFTER - 1):
        run(x)
    assert ran[2 * SAMPLES:] == ["cpu"] * (CONFIRM_AFTER - 1)
    del ran[:]
    for _ in range(2 * SAMPLES + 2 * CONFIRM_AFTER):
        run(x)
    assert ran[:2 * SAMPLES] == ["cpu", "dense"] * SAMPLES      # the second round, from the CONFIRM_AFTER-th call
    assert ran[2 * SAMPLES:] == [final] * (2 * CONFIRM_AFTER)   # final: no third round
    assert list(floor.floor_decisions().values()) == [final] and floor.floor_settled()


def test_a_composite_choice_is_final(toy):
    kernel, costs, ran = toy
    x = torch.zeros(5)
    costs["cpu"] = 2.0
    for _ in range(2 * SAMPLES + 2 * CONFIRM_AFTER):
        floor.with_floor("toy", kernel, x)(x)
    assert ran[2 * SAMPLES:] == ["dense"] * (2 * CONFIRM_AFTER) and floor.floor_settled()


@pytest.mark.parametrize("kernel_cost,winner", [(0.1, "cpu"), (10.0, "dense")])
def test_a_side_slower_beyond_noise_loses_after_one_counted_call_each(toy, kernel_cost, winner):
    kernel, costs, ran = toy
    costs["cpu"] = kernel_cost
    x = torch.zeros(5)
    run = floor.with_floor("toy", kernel, x)
    for _ in range(4 + 2 * CONFIRM_AFTER):
        run(x)
    assert ran[:4] == ["cpu", "dense"] * 2   # a warm-up and one counted call each
    assert ran[4:] == [winner] * (2 * CONFIRM_AFTER) and floor.floor_settled()  # final: no second round


def test_a_gap_within_the_decisive_factor_takes_every_sample(toy):
    kernel, costs, ran = toy
    costs["cpu"] = 1.0 / (0.99 * floor.DECISIVE)
    x = torch.zeros(5)
    for _ in range(2 * SAMPLES):
        floor.with_floor("toy", kernel, x)(x)
    assert ran == ["cpu", "dense"] * SAMPLES
    assert list(floor.floor_decisions().values()) == ["cpu"] and not floor.floor_settled()


def test_one_fast_outlier_does_not_decide(toy):
    kernel, costs, ran = toy
    x = torch.zeros(5)
    for i in range(2 * SAMPLES):
        costs["dense"] = 0.5 if i == 3 else 2.0   # one lucky composite call among slow ones
        floor.with_floor("toy", kernel, x)(x)
    assert list(floor.floor_decisions().values()) == ["cpu"]


def test_shape_classes_bucket_tokens_and_are_decided_apart(toy):
    kernel, costs, ran = toy
    for m in (3, 4, 5):
        x = torch.zeros(m)
        floor.with_floor("toy", kernel, x)(x)
    keys = sorted(key[-1] for key in floor.floor_decisions())
    assert keys == [(4,), (8,)]
    assert floor.tokens_bucket(1) == 1 and floor.tokens_bucket(1000) == 1024 and floor.tokens_bucket(0) == 1
    assert floor.density_bucket(1, 100) == 1 and floor.density_bucket(100, 100) == 16


def test_off_mode_and_deterministic_algorithms_run_the_kernel_unmeasured(toy, monkeypatch):
    kernel, costs, ran = toy
    costs["cpu"] = 10.0
    x = torch.zeros(5)
    monkeypatch.setattr(floor, "_mode", "off")
    assert floor.with_floor("toy", kernel, x) is kernel
    monkeypatch.setattr(floor, "_mode", "measure")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2 * SAMPLES + 1):
            floor.with_floor("toy", kernel, x)(x)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert ran == ["cpu"] * (2 * SAMPLES + 1) and floor.floor_decisions() == {}


@pytest.mark.parametrize("tokens,side", [(1, "cpu"), (2, "dense")])   # the toy's sure win and sure loss
def test_calls_decided_in_advance_are_not_measured(toy, tokens, side):
    kernel, costs, ran = toy
    costs["cpu"] = 10.0 if side == "cpu" else 0.1   # the clock would say otherwise
    x = torch.zeros(tokens)
    for _ in range(2 * SAMPLES + 1):
        floor.with_floor("toy", kernel, x)(x)
    assert ran == [side] * (2 * SAMPLES + 1) and list(floor.floor_decisions().values()) == [side]


def test_a_class_sure_outcome_is_judged_on_its_first_call_only(toy, monkeypatch):
    kernel, _, ran = toy
    judged = []
    _, key, _, _ = floor._composites["toy"]
    monkeypatch.setitem(floor._composites, "toy", ("dense", key, lambda x: judged.append(x.shape[0]) or True, None))
    x = torch.zeros(1)
    for _ in range(5):
        floor.with_floor("toy", kernel, x)(x)
    assert judged == [1] and ran == ["cpu"] * 5


@pytest.mark.parametrize("native_fp16", [False, True], ids=["no-fp16-hardware", "avx512_fp16"])
def test_fp16_calls_run_the_kernel_unmeasured_where_the_cpu_lacks_fp16_arithmetic(toy, monkeypatch, native_fp16):
    kernel, costs, ran = toy
    capabilities = {"avx512_fp16": native_fp16, "amx_fp16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    costs["cpu"] = 10.0   # the clock would pick the composite
    x = torch.zeros(5, dtype=torch.float16)
    for _ in range(2 * SAMPLES + 1):
        floor.with_floor("toy", kernel, x)(x)
    if native_fp16:
        assert ran[:4] == ["cpu", "dense"] * 2 and set(ran[4:]) == {"dense"}   # measured: decisively slower
    else:
        assert ran == ["cpu"] * (2 * SAMPLES + 1) and list(floor.floor_decisions().values()) == ["cpu"]
    floor.reset_floor()
    ran.clear()
    for _ in range(2):   # other dtypes are measured as before
        floor.with_floor("toy", kernel, x.float())(x.float())
    assert ran == ["cpu", "dense"]


def test_fp16_calls_are_measured_on_the_portable_path(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_fp16": False, "amx_fp16": False},
                        raising=False)
    assert floor.fp16_without_hardware()
    monkeypatch.setenv("SPARSEKERN_CPU_ISA", "portable")
    assert not floor.fp16_without_hardware()


def test_fp16_hardware_is_read_from_torch():
    capabilities = getattr(torch.cpu, "get_capabilities", lambda: {})()
    if "avx512_fp16" not in capabilities:
        assert not floor.fp16_without_hardware()   # torch cannot say: measured as any dtype
    else:
        assert floor.fp16_without_hardware() == (not capabilities["avx512_fp16"] and
                                                 not capabilities.get("amx_fp16", False))


def test_gpu_kernels_are_measured_against_the_composite_whatever_the_cpu_sure_outcomes(toy):
    kernel, costs, ran = toy
    x = torch.zeros(1)   # the toy's sure win on CPUs
    for _ in range(2 * SAMPLES + 2):
        floor.with_floor("toy", kernel, x, "triton")(x)
    assert ran[:2 * SAMPLES] == ["cpu", "dense"] * SAMPLES   # the kernel passed in, measured
    [(key, choice)] = floor.floor_decisions().items()
    assert key[:2] == ("toy", "triton") and choice == "dense"   # level timings: the composite


def test_backends_outside_the_rule_run_unwrapped(toy):
    kernel, _, _ = toy
    x = torch.zeros(5)
    for backend in ("reference", "dense"):
        assert floor.with_floor("toy", kernel, x, backend) is kernel
    assert floor.final_choice("toy", "reference", x, x) is None


def test_gpu_timings_wait_for_the_current_stream_before_and_after_the_call(monkeypatch):
    events = []

    class Stream:
        def __init__(self, device):
            self.device = str(device)

        def synchronize(self):
            events.append(("sync", self.device))

    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    out, seconds = floor._timed(lambda v: events.append("call") or v + 1, (1,), torch.device("cuda:1"))
    assert out == 2 and seconds >= 0
    assert events == [("sync", "cuda:1"), "call", ("sync", "cuda:1")]
    events.clear()
    floor._timed(lambda: events.append("call"), (), CPU)
    assert events == ["call"]


@pytest.mark.parametrize("decided", [False, True])
def test_a_cuda_graph_capture_runs_the_decided_side_or_the_kernel_untimed(toy, monkeypatch, decided):
    kernel, costs, ran = toy
    costs["cpu"] = 2.0
    x = torch.zeros(5)
    if decided:
        for _ in range(2 * SAMPLES):
            floor.with_floor("toy", kernel, x)(x)
    before = dict(floor.floor_decisions())
    del ran[:]
    monkeypatch.setattr(floor, "_capturing", lambda device: True)
    for _ in range(3):
        floor.with_floor("toy", kernel, x)(x)
    assert ran == ["dense" if decided else "cpu"] * 3
    assert floor.floor_decisions() == before or not decided and set(floor.floor_decisions().values()) == {"measuring"}


def test_block_sparse_layers_at_a_quarter_density_or_less_are_not_measured(measuring):
    if "cpu" not in sk.kernels.available_backends("bsr_forward", CPU, torch.float32):
        pytest.skip("the cpu backend is not built")
    layer = sk.SparseLinear(64, 64, block_size=16, density=0.25)
    layer(torch.randn(8, 64, requires_grad=True)).sum().backward()   # one call decides: nothing to measure
    assert set(floor.floor_decisions().values()) == {"cpu"}


@pytest.mark.parametrize("engine,has_amx,measured", [
    ("widened to fp32", False, True), ("amx tiles", True, False),
    ("dot-product tiles", False, False), ("dot-product tiles", True, True)])
def test_bf16_at_a_quarter_is_measured_unless_its_engine_matches_dense_bf16(measuring, monkeypatch, engine,
                                                                            has_amx, measured):
    if "cpu" not in sk.kernels.available_backends("bsr_forward", CPU, torch.bfloat16):
        pytest.skip("the cpu backend is not built")
    from sparsekern.kernels.bsr import cpu as bsr_cpu
    monkeypatch.setattr(bsr_cpu, "bf16_engine", lambda block_size: engine)
    monkeypatch.setattr(bsr_cpu, "_cpu_has_amx_bf16", lambda: has_amx)
    layer = sk.SparseLinear(64, 64, block_size=16, density=0.25, dtype=torch.bfloat16)
    layer(torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
    decided = set(floor.floor_decisions().values())
    assert decided == ({"measuring"} if measured else {"cpu"})


def test_fp16_at_a_quarter_is_measured_where_the_cpu_has_fp16_arithmetic(measuring, monkeypatch):
    if "cpu" not in sk.kernels.available_backends("bsr_forward", CPU, torch.float16):
        pytest.skip("the cpu backend is not built")
    monkeypatch.setattr(floor, "fp16_without_hardware", lambda: False)
    layer = sk.SparseLinear(64, 64, block_size=16, density=0.25, dtype=torch.float16)
    layer(torch.randn(8, 64, dtype=torch.float16, requires_grad=True)).sum().backward()
    assert set(floor.floor_decisions().values()) == {"measuring"}


def test_mode_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.setattr(floor, "_mode", None)
    monkeypatch.setenv("SPARSEKERN_FLOOR", "off")
    assert floor.floor_mode() == "off"
    with pytest.raises(ValueError, match="unknown floor mode 'sometimes'"):
        floor.set_floor_mode("sometimes")


def _families():
    cases = []
    linear_input = (40, 64)
    if "cpu" in sk.kernels.available_backends("bsr_forward", CPU, torch.float32):
        cases.append(pytest.param(lambda: sk.SparseLinear(64, 96, block_size=16, density=0.75), linear_input,
                      {"bsr_forward", "bsr_grad_input", "bsr_grad_weight"}, id="bsr"))
    if "cpu" in sk.kernels.available_backends("lowrank_forward", CPU, torch.float32):
        cases.append(pytest.param(lambda: sk.LowRankLinear(64, 96, rank=8), linear_input,
                                  {"lowrank_forward", "lowrank_backward"}, id="lowrank"))
    if "cpu" in sk.kernels.available_backends("semi_forward", CPU, torch.float32):
        cases.append(pytest.param(lambda: sk.SemiSparseLinear(64, 96), linear_input,
                      {"semi_forward", "semi_grad_input", "semi_grad_weight"}, id="semi"))
    if "cpu" in sk.kernels.available_backends("conv_forward", CPU, torch.float32):
        cases.append(pytest.param(lambda: sk.SparseConv2d(32, 48, 3, padding=1, block_size=16, density=0.75),
                                  (3, 32, 6, 7), {"conv_forward", "conv_grads"}, id="conv"))
    return cases


@pytest.mark.parametrize("make,shape,products", _families())
def test_layers_are_right_on_every_call_while_the_rule_measures(make, shape, products, measuring):
    torch.manual_seed(0)
    sparse = make()
    reference = make()
    reference.load_state_dict(sparse.state_dict())
    x = torch.randn(*shape)
    for _ in range(2 * SAMPLES + 1):
        x_sparse, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        sparse(x_sparse).square().sum().backward()
        with sk.use_backend("reference"):
            reference(x_ref).square().sum().backward()
        torch.testing.assert_close(x_sparse.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
        for got, want in zip(sparse.parameters(), reference.parameters()):
            if want.grad is not None:
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)
        sparse.zero_grad()
        reference.zero_grad()
    decisions = floor.floor_decisions()
    assert {key[0] for key in decisions} == products
    assert set(decisions.values()) <= {"cpu", "dense", "reference"} and "measuring" not in decisions.values()


def test_a_forced_backend_is_obeyed_and_not_measured(measuring):
    if "cpu" not in sk.kernels.available_backends("bsr_forward", CPU, torch.float32):
        pytest.skip("the cpu backend is not built")
    layer = sk.SparseLinear(64, 96, block_size=16, density=0.75)
    with sk.use_backend("cpu"):
        layer(torch.randn(8, 64)).sum().backward()
    assert floor.floor_decisions() == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dense_composite_matches_the_reference(dtype):
    from sparsekern.kernels.bsr import dense, reference
    weight = random_bsr((96, 64), 16, 0.4, dtype=dtype, seed=3)
    x, dy, bias = torch.randn(7, 64, dtype=dtype), torch.randn(7, 96, dtype=dtype), torch.randn(96, dtype=dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    for product, args in [("bsr_forward", (x, weight.values, weight.layout, bias)),
                          ("bsr_grad_input", (dy, weight.values, weight.layout)),
                          ("bsr_grad_weight", (dy, x, weight.layout, True))]:
        torch.testing.assert_close(getattr(dense, product)(*args), getattr(reference, product)(*args), **tol)


def test_benchmarks_time_the_settled_choice(measuring):
    from sparsekern.cli.timing import describe_floor, settle_floor
    if "cpu" not in sk.kernels.available_backends("bsr_forward", CPU, torch.float32):
        pytest.skip("the cpu backend is not built")
    layer = sk.SparseLinear(64, 96, block_size=16, density=0.75)
    x = torch.randn(8, 64, requires_grad=True)
    choices = settle_floor(lambda: layer(x).sum().backward())
    assert set(choices) == {"bsr_forward", "bsr_grad_input", "bsr_grad_weight"}
    assert set(choices.values()) <= {"cpu", "dense"}
    assert describe_floor({}) == "-" and describe_floor({"a": "cpu"}) == describe_floor({"a": "triton"}) == "kernels"
    assert describe_floor({"b": "dense", "a": "cpu"}) == "composite: b"


def test_decisions_are_reported_per_product_with_differing_classes_joined(monkeypatch):
    from sparsekern.cli.timing import describe_floor
    decisions = {("conv_forward", torch.float32, 2, "a"): "cpu", ("conv_forward", torch.float32, 2, "b"): "reference",
                 ("conv_grads", torch.float32, 2, "a"): "cpu"}
    monkeypatch.setattr(floor, "floor_decisions", lambda: decisions)
    choices = floor.decisions_by_product()
    assert choices == {"conv_forward": "cpu/reference", "conv_grads": "cpu"}
    assert describe_floor(choices) == "composite: conv_forward (cpu/reference)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("make,products", [
    (lambda: sk.SparseLinear(256, 256, block_size=32, density=0.5, device="cuda"),
     {"bsr_forward", "bsr_grad_input", "bsr_grad_weight"}),
    (lambda: sk.LowRankLinear(256, 256, rank=32, device="cuda"), {"lowrank_forward", "lowrank_backward"}),
], ids=["bsr", "lowrank"])
def test_gpu_layers_are_right_while_the_rule_measures_and_settle(make, products, measuring, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    sparse, reference = make(), make()
    reference.load_state_dict(sparse.state_dict())
    x = torch.randn(512, 256, device="cuda")
    for _ in range(4 * SAMPLES + CONFIRM_AFTER):
        x_sparse, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        sparse(x_sparse).square().sum().backward()
        with sk.use_backend("reference"):
            reference(x_ref).square().sum().backward()
        torch.testing.assert_close(x_sparse.grad, x_ref.grad, rtol=1e-3, atol=1e-3)
        sparse.zero_grad()
        reference.zero_grad()
    decisions = floor.floor_decisions()
    assert {key[0] for key in decisions} == products and {key[1] for key in decisions} == {"triton"}
    assert set(decisions.values()) <= {"triton", "dense"} and floor.floor_settled()
