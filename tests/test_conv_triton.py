"""The triton backend of the conv products.

On CPU the kernels run in triton's interpreter (TRITON_INTERPRET=1, set per test by the
``interpreter`` fixture), on the shared awkward geometries, against the reference backend
in fp64. There every buffer ``torch.empty`` hands out is NaN-filled, so an output element
a kernel fails to write fails the test. Without a GPU the kernels are still compiled to
cubin for sm_80 and sm_90; tests on a real GPU (autotuned kernels) are marked ``gpu``.
"""
import importlib.util
import inspect
import subprocess
import sys

import pytest
import torch

import sparsekern as sk
from helpers import relative_error
from sparsekern.formats.bsr import BlockLayout
from sparsekern.kernels.conv import output_memory_format, reference
from test_conv_cases import CASES, conv_case, output_gradient

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
              pytest.mark.usefixtures("one_thread")]

CPU = torch.device("cpu")
# Relative error (norm) bounds against the fp64 reference.
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
# A block wider than the interpreter's 16-wide tiles: output sub-tiles and K chunks run.
BLOCK32 = (64, 64, 2, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 32, 2, (5, 6), 0.75)


uses_interpreter = pytest.mark.usefixtures("interpreter")


def _kernels():
    from sparsekern.kernels.conv import triton_conv
    return triton_conv


def _wide(values):
    return values.double() if isinstance(values, torch.Tensor) and values.is_floating_point() else values


def _check_products(x, values, layout, geometry, bias, dy):
    """The three triton products against the reference backend in fp64."""
    kernels, dtype = _kernels(), x.dtype
    calls = [("conv_forward", (x, values, layout, geometry, bias), output_memory_format(x)),
             ("conv_grad_input", (dy, values, layout, geometry, tuple(x.shape[2:])), output_memory_format(dy)),
             ("conv_grad_weight", (dy, x, layout, geometry), torch.contiguous_format)]
    for product, args, memory_format in calls:
        got, want = getattr(kernels, product)(*args), getattr(reference, product)(*map(_wide, args))
        if product == "conv_grad_weight":  # (dvalues, dbias or None)
            assert got[1] is None and want[1] is None
            got, want = got[0], want[0]
        assert got.shape == want.shape and got.dtype == dtype, product
        assert got.is_contiguous(memory_format=memory_format), product
        if want.numel():
            assert relative_error(got, want) < BOUNDS[dtype], product


# The shared geometries minus the slowest in the interpreter (5x5 and a 5x12 image add no path; the
# tall image is for the CPU kernels' row chunks, which Triton does not have).
FP32_CASES = [name for name in CASES if name not in ("5x5-stride2x1", "valid-non-square", "tall-image-row-chunks")]


@uses_interpreter
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_forward_without_bias(fmt):
    """No bias: the kernel must not read the stand-in pointer (an unwritten, NaN-filled output here)."""
    x, values, layout, geometry, _ = conv_case("same-even-kernel", torch.float32, seed=4)
    x = x.contiguous(memory_format=fmt)
    got = _kernels().conv_forward(x, values, layout, geometry, None)
    want = reference.conv_forward(x.double(), values.double(), layout, geometry, None)
    assert relative_error(got, want) < BOUNDS[torch.float32]


@uses_interpreter
@pytest.mark.parametrize("name", FP32_CASES)
def test_products_match_reference_fp32(name):
    x, values, layout, geometry, bias = conv_case(name, torch.float32)
    # Both memory formats across the cases: the kernels read and write through strides.
    fmt = torch.channels_last if FP32_CASES.index(name) % 2 else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    _check_products(x, values, layout, geometry, bias, output_gradient(x, geometry).contiguous(memory_format=fmt))


@uses_interpreter
@pytest.mark.parametrize("name,dtype", [("same-even-kernel", torch.float16), ("stride2", torch.bfloat16),
                                        ("block32-stride2-groups2", torch.float32)], ids=str)
def test_products_match_reference_half_and_wide_blocks(name, dtype, monkeypatch):
    monkeypatch.setitem(CASES, "block32-stride2-groups2", BLOCK32)
    x, values, layout, geometry, bias = conv_case(name, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    _check_products(x, values, layout, geometry, bias, output_gradient(x, geometry))


@uses_interpreter
def test_metadata_outside_the_grid_is_never_read():
    """A block whose column (forward, dW) or row (dX) lies outside the grid contributes
    nothing and reads nothing: every load is masked by the channel and block bounds."""
    kernels = _kernels()
    x, values, layout, geometry, bias = conv_case("stride2", torch.float32)
    dy = output_gradient(x, geometry)
    bad = 2 if layout.nnz_blocks > 2 else 0
    cols, t_rows = layout.col_indices.clone(), layout.t_row_indices.clone()
    cols[bad] = 10**6
    t_rows[(layout.t_block_ids == bad).nonzero()[0, 0]] = -10**6
    corrupt = BlockLayout(layout.shape, layout.block_size, layout.block_mask, layout.row_offsets, cols,
                          layout.row_indices, layout.col_offsets, layout.t_block_ids, t_rows)
    without = values.clone()
    without[bad] = 0
    input_size = tuple(x.shape[2:])
    torch.testing.assert_close(kernels.conv_forward(x, values, corrupt, geometry, bias),
                               reference.conv_forward(x, without, layout, geometry, bias))
    torch.testing.assert_close(kernels.conv_grad_input(dy, values, corrupt, geometry, input_size),
                               reference.conv_grad_input(dy, without, layout, geometry, input_size))
    dw = kernels.conv_grad_weight(dy, x, corrupt, geometry)[0]
    assert torch.equal(dw[bad], torch.zeros_like(dw[bad]))


@uses_interpreter
def test_sparse_conv2d_on_triton_matches_reference():
    """The whole op (autograd: dX, dW, bias) forced onto triton."""
    dtype = torch.bfloat16
    x, values, layout, geometry, bias = conv_case("same-even-kernel", dtype, seed=3)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    values.requires_grad_()
    bias.requires_grad_()
    dy = output_gradient(x, geometry)
    results = {}
    for backend in ("triton", "reference"):
        for leaf in (x, values, bias):
            leaf.grad = None
        with sk.use_backend(backend):
            y = sk.ops.sparse_conv2d(x, values, layout, geometry, bias)
            y.backward(dy)
        results[backend] = [y.detach(), x.grad, values.grad, bias.grad]
    for got, want in zip(results["triton"], results["reference"]):
        assert relative_error(got, want) < BOUNDS[dtype]


def _strided(t, dim):
    """``t`` as a view with every other element along ``dim`` of a twice-as-large buffer."""
    shape = list(t.shape)
    shape[dim] *= 2
    wide = torch.full(shape, float("nan") if t.is_floating_point() else 10 ** 9, dtype=t.dtype)
    index = [slice(None)] * t.dim()
    index[dim] = slice(None, None, 2)
    view = wide[tuple(index)]
    view.copy_(t)
    return view


@uses_interpreter
@pytest.mark.parametrize("dim", [1, 3], ids=["channel-strided", "column-strided"])
def test_strided_inputs_match_reference(dim):
    """Views that are in no memory format (every other channel or column of a larger buffer):
    x and dy are read through their strides; bias and the metadata are made dense."""
    x, values, layout, geometry, bias = conv_case("groups2-stride1x2", torch.float32)
    dy = output_gradient(x, geometry)
    x, dy, bias = _strided(x, dim), _strided(dy, dim), _strided(bias, 0)
    assert not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or bias.is_contiguous())
    strided = BlockLayout(layout.shape, layout.block_size, layout.block_mask,
                          *(_strided(t, 0) for t in (layout.row_offsets, layout.col_indices, layout.row_indices,
                                                     layout.col_offsets, layout.t_block_ids, layout.t_row_indices)))
    kernels, input_size = _kernels(), tuple(x.shape[2:])
    for got, want in [
        (kernels.conv_forward(x, values, strided, geometry, bias),
         reference.conv_forward(x.double(), values.double(), layout, geometry, bias.double())),
        (kernels.conv_grad_input(dy, values, strided, geometry, input_size),
         reference.conv_grad_input(dy.double(), values.double(), layout, geometry, input_size)),
        (kernels.conv_grad_weight(dy, x, strided, geometry)[0],
         reference.conv_grad_weight(dy.double(), x.double(), layout, geometry)[0]),
    ]:
        assert relative_error(got, want) < BOUNDS[torch.float32]


@uses_interpreter
def test_more_pixels_than_32_bit_indices_are_refused_before_allocating():
    """Batches of 2**31 pixels, as stride-0 views (no memory): refused with a reason, not wrapped."""
    kernels = _kernels()
    _, values, layout, geometry, _ = conv_case("stride2", torch.float32)
    c, (h, w) = geometry.in_channels, (64, 64)
    ho, wo = geometry.output_size(h, w)
    n = -(-2 ** 31 // (ho * wo))
    x = torch.zeros(1, c, h, w).expand(n, c, h, w)
    dy = torch.zeros(1, geometry.out_channels, ho, wo).expand(n, -1, -1, -1)
    with pytest.raises(ValueError, match="32-bit pixel index"):
        kernels.conv_forward(x, values, layout, geometry)
    with pytest.raises(ValueError, match="32-bit pixel index"):
        kernels.conv_grad_weight(dy, x, layout, geometry)
    n = -(-2 ** 31 // (-(-h // 2) * -(-w // 2)))  # dX indexes the pixels of one stride phase
    with pytest.raises(ValueError, match="32-bit pixel index"):
        kernels.conv_grad_input(dy[:1].expand(n, -1, -1, -1), values, layout, geometry, (h, w))


def test_grids_past_32_bit_program_ids_are_refused():
    kernels = _kernels()
    assert kernels._grid(2 ** 31 - 1) == (2 ** 31 - 1,)
    with pytest.raises(ValueError, match="programs"):
        kernels._grid(2 ** 31)


def test_launches_on_the_tensors_device(monkeypatch):
    """triton launches on the current CUDA device: each launch enters the tensors' device."""
    import contextlib
    from types import SimpleNamespace
    kernels, events = _kernels(), []

    @contextlib.contextmanager
    def device(index):
        events.append(("enter", index))
        yield
        events.append(("exit", index))

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: events.append(("launch", grid({"BP": 32}) if callable(grid) else grid))

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(kernels, "_kernel", lambda name, interpret: Kernel())
    on_gpu1 = SimpleNamespace(device=torch.device("cuda", 1))
    kernels._launch("forward", lambda cfg: 3 * cfg["BP"], (on_gpu1,), {}, {"BP": 16})
    assert events == [("enter", torch.device("cuda", 1)), ("launch", (96,)), ("exit", torch.device("cuda", 1))]


class TestAvailability:
    @uses_interpreter
    def test_the_bsr_rule_cpu_needs_the_interpreter(self, monkeypatch):
        name, _ = sk.kernels.select_kernel("conv_forward", CPU, torch.float32, "triton")
        assert name == "triton"
        assert sk.kernels.select_kernel("conv_grad_weight", CPU, torch.float32)[0] != "triton"  # forced only
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(sk.kernels.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            sk.kernels.select_kernel("conv_grad_input", CPU, torch.float32, "triton")
        with pytest.raises(sk.kernels.BackendUnavailableError, match="float64"):
            sk.kernels.select_kernel("conv_forward", torch.device("cuda"), torch.float64, "triton")

    def test_cuda_tensors_prefer_triton(self):
        for product in ("conv_forward", "conv_grad_input", "conv_grad_weight"):
            assert sk.kernels.select_kernel(product, torch.device("cuda"), torch.bfloat16)[0] == "triton"

    def test_import_loads_no_triton(self):
        code = ("import sys, sparsekern; "
                "assert 'triton' not in sys.modules, 'import sparsekern loaded triton'; "
                "assert 'sparsekern.kernels.conv.triton_conv' not in sys.modules")
        subprocess.run([sys.executable, "-c", code], check=True)


def _compile_for_gpu(arch):
    """Compile the three kernels to cubin for sm_<arch> (ptxas ships with triton); no GPU needed.
    Returns {kernel name: ptx}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernels = _kernels()
    ints = ("nnz n_rows n_cols GROUPS P PA A B HO WO H W CIN_G COUT COUT_G sxn sxc sxh sxw syn syc syh syw sdn sdc "
            "sdh sdw SH SW PT PL DH DW p_per_split P_BUCKET").split()
    common = dict(BS=32, KH=3, KW=3, UPCAST=False)
    ptx = {}
    for fn, pointers, constants in [
        (kernels._forward_kernel, dict(x_ptr="*bf16", v_ptr="*bf16", bias_ptr="*bf16", y_ptr="*bf16",
                                       offsets_ptr="*i64", cols_ptr="*i64"),
         dict(HAS_BIAS=True, PRECISION="ieee", BP=64, BN=32, BK=32, **common)),
        (kernels._grad_input_kernel, dict(dy_ptr="*fp16", v_ptr="*fp16", dx_ptr="*fp16", offsets_ptr="*i64",
                                          ids_ptr="*i64", rows_ptr="*i64"),
         dict(PRECISION="ieee", BP=64, BN=32, BK=32, **common)),
        (kernels._grad_weight_kernel, dict(dy_ptr="*fp32", x_ptr="*fp32", out_ptr="*fp32", rows_ptr="*i64",
                                           cols_ptr="*i64"),
         dict(PRECISION="tf32", TR=32, TC=32, BM=64, **common)),
    ]:
        # In the kernel's argument order: ASTSource matches the signature by position.
        types = {**dict.fromkeys(ints, "i32"), **pointers}
        signature = {name: types.get(name, "constexpr") for name in inspect.signature(fn).parameters}
        compiled = triton.compile(ASTSource(triton.jit(fn), signature, constants),
                                  target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, num_stages=3))
        assert compiled.asm["cubin"]
        ptx[fn.__name__] = compiled.asm["ptx"]
    return ptx


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu_targets(arch, monkeypatch, tmp_path):
    """Without a GPU, still compile the kernels to cubin (ptxas included) for sm_80 and sm_90;
    the half-precision products must reach the tensor cores (mma / wgmma)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # private: other processes compile too
    ptx = _compile_for_gpu(arch)
    assert "mma" in ptx["_forward_kernel"] and "mma" in ptx["_grad_input_kernel"]


def test_autotune_configs_fit_the_block(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled-mode (autotuned) kernels
    kernels = _kernels()
    for name, edges in [("forward", ("BN", "BK")), ("grad_input", ("BN", "BK")), ("grad_weight", ("TR", "TC"))]:
        tuned = kernels._kernel(name, False)
        assert tuned.keys == ["P_BUCKET", "BS", "KH", "KW"]
        for bs in (8, 32, 128):
            configs = kernels._pruner(edges)(tuned.configs, {}, BS=bs)
            assert len(configs) >= 4 and len({str(c) for c in configs}) == len(configs)
            assert all(16 <= c.kwargs[e] <= max(16, bs) for c in configs for e in edges)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block,groups,stride", [(16, 1, 1), (32, 2, 2), (64, 1, 1)], ids=str)
def test_gpu_autotuned_products_match_reference(block, groups, stride, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = _kernels()
    spec = (256, 192, groups, (3, 3), (stride, stride), (1, 1, 1, 1), (1, 1), block, 8, (28, 28), 0.4)
    monkeypatch.setitem(CASES, "gpu", spec)
    x, values, layout, geometry, bias = (t.cuda() if isinstance(t, torch.Tensor) else t
                                         for t in conv_case("gpu", dtype))
    layout = layout.to("cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    dy = output_gradient(x, geometry).cuda()
    bound = 1e-3 if dtype == torch.float32 else 2e-2  # TF32 may be on for fp32
    for got, want in [
        (kernels.conv_forward(x, values, layout, geometry, bias),
         reference.conv_forward(x.double(), values.double(), layout, geometry, bias.double())),
        (kernels.conv_forward(x, values, layout, geometry, None),  # the bias pointer unread
         reference.conv_forward(x.double(), values.double(), layout, geometry, None)),
        (kernels.conv_grad_input(dy, values, layout, geometry, (28, 28)),
         reference.conv_grad_input(dy.double(), values.double(), layout, geometry, (28, 28))),
        (kernels.conv_grad_weight(dy, x, layout, geometry)[0],
         reference.conv_grad_weight(dy.double(), x.double(), layout, geometry)[0]),
        (kernels.conv_grad_weight(dy, x, layout, geometry, bias_grad=True)[1], dy.double().sum((0, 2, 3))),
    ]:
        assert relative_error(got, want) < bound


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_products_on_a_device_other_than_the_current_one(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = _kernels()
    x, values, layout, geometry, bias = conv_case("stride2", torch.float32)
    on_gpu1 = [t.to("cuda:1") for t in (x, values, bias)]
    with torch.cuda.device(0):
        y = kernels.conv_forward(on_gpu1[0], on_gpu1[1], layout.to("cuda:1"), geometry, on_gpu1[2])
    want = reference.conv_forward(x.double(), values.double(), layout, geometry, bias.double())
    assert y.device == torch.device("cuda", 1) and relative_error(y.cpu(), want) < 1e-3
