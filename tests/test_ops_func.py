"""The layers under torch.func's transforms: grad, vmap (per-sample gradients, model ensembles),
jacrev, grad of grad, jvp, jacfwd and hessian give what torch.autograd gives on the same layers, as
do forward_ad's dual tensors; first-order modes refuse what they cannot give by name."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

import sparsekern as sk
from sparsekern.methods import DLRT
from sparsekern.nn import PartiallyTrainableConv2d, PartiallyTrainableLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _layers():
    """(id, layer factory, per-sample input shape); fp64, shapes off the blocks."""
    conv_mask = torch.tensor([[True, False, True], [False, True, True]])
    return [
        ("sparse_linear", lambda: sk.SparseLinear(20, 12, block_size=4, density=0.5), (3, 20)),
        ("sparse_conv", lambda: sk.SparseConv2d.from_dense(nn.Conv2d(12, 8, 3, padding=1, stride=2), block_size=4,
                                                           block_mask=conv_mask), (2, 12, 5, 6)),
        ("semi_transposable", lambda: sk.SemiSparseLinear(24, 16), (3, 24)),
        ("semi_rowwise", lambda: sk.SemiSparseLinear(24, 16, transposable=False), (3, 24)),
        ("semi_dynamic", lambda: sk.SemiSparseLinear(24, 16, mode="dynamic"), (3, 24)),
        ("low_rank_linear", lambda: sk.LowRankLinear(20, 12, 3), (3, 20)),
        ("low_rank_conv", lambda: sk.LowRankConv2d(6, 8, 3, 3, padding=1), (2, 6, 5, 5)),
        ("partially_trainable_linear", lambda: PartiallyTrainableLinear.from_dense(
            nn.Linear(20, 12), torch.tensor([[True, False, True], [False, True, True]]), block_size=8), (3, 20)),
        ("partially_trainable_conv", lambda: PartiallyTrainableConv2d(
            nn.Conv2d(12, 8, 3, padding=1), conv_mask, block_size=4), (2, 12, 5, 5)),
    ]


LAYERS = pytest.mark.parametrize("name,factory,shape", _layers(), ids=[case[0] for case in _layers()])


def _layers_by_name():
    return [(name, factory) for name, factory, _ in _layers()]
DIFFERENTIABLE_TWICE = {"sparse_linear", "sparse_conv", "semi_transposable", "semi_rowwise", "low_rank_linear",
                        "low_rank_conv", "partially_trainable_linear", "partially_trainable_conv"}


def _setup(factory, shape, seed=0):
    torch.manual_seed(seed)
    layer = factory().double()
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    return layer, params, torch.randn(shape, dtype=torch.float64)


def _loss(layer):
    def loss(params, x):
        return functional_call(layer, params, (x,)).sin().sum()
    return loss


def _autograd_grads(layer, x):
    layer.zero_grad(set_to_none=True)
    layer(x).sin().sum().backward()
    return {k: v.grad.clone() for k, v in layer.named_parameters() if v.requires_grad}


def _assert_close_dicts(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=key)


@LAYERS
def test_grad_matches_autograd(name, factory, shape):
    layer, params, x = _setup(factory, shape)
    grads, dx = grad(_loss(layer), argnums=(0, 1))(params, x)
    _assert_close_dicts(grads, _autograd_grads(layer, x))
    xr = x.clone().requires_grad_()
    layer(xr).sin().sum().backward()
    torch.testing.assert_close(dx, xr.grad)


@LAYERS
def test_per_sample_gradients_match_one_backward_per_sample(name, factory, shape):
    """vmap of grad over the batch: the forward and dX fold the samples into one call, dW runs per sample."""
    layer, params, x = _setup(factory, shape, seed=1)
    per_sample = vmap(grad(_loss(layer)), in_dims=(None, 0))(params, x.unsqueeze(1))
    expected = [_autograd_grads(layer, x[i:i + 1]) for i in range(shape[0])]
    _assert_close_dicts(per_sample, {k: torch.stack([e[k] for e in expected]) for k in expected[0]})


@LAYERS
def test_vmap_over_stacked_weights_is_an_ensemble(name, factory, shape):
    """Models of one structure with their own weights (torch.func.stack_module_state on the
    parameters, the structure's buffers shared): each op runs once per model."""
    first, _, x = _setup(factory, shape, seed=2)
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(torch.randn_like(p))
    params, _ = stack_module_state([first, second])
    buffers = dict(first.named_buffers())

    def run(p):
        return functional_call(first, (p, buffers), (x,))
    with torch.no_grad():
        torch.testing.assert_close(vmap(run)(params), torch.stack([first(x), second(x)]))


@LAYERS
def test_jacrev_matches_autograd_jacobian(name, factory, shape):
    layer, params, x = _setup(factory, shape, seed=4)
    x = x[:1]
    jacobian = jacrev(lambda x: functional_call(layer, params, (x,)))(x)
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(layer, x))


@LAYERS
def test_jacrev_of_the_parameters_matches_autograd_jacobian(name, factory, shape):
    """The Jacobian of the output in every parameter: the weight gradients under vmap of their
    incoming gradient (dY mapped, the input not)."""
    layer, params, x = _setup(factory, shape, seed=8)
    x = x[:1]
    names = list(params)

    def run(*values):
        return functional_call(layer, dict(zip(names, values)), (x,))
    jacobians = jacrev(run, argnums=tuple(range(len(names))))(*params.values())
    expected = torch.autograd.functional.jacobian(run, tuple(params.values()))
    for actual, wanted, key in zip(jacobians, expected, names):
        torch.testing.assert_close(actual, wanted, msg=key)


@pytest.mark.parametrize("tokens", [0, 3, 9])
@pytest.mark.parametrize("kind", ["sparse_linear", "semi_transposable"])
def test_per_sample_gradients_of_samples_with_several_tokens(kind, tokens):
    """dW per sample: gathered products up to a few tokens (a block's height, 4; a 2:4 group's
    width, 4), a kernel call per sample beyond."""
    factory = dict(_layers_by_name())[kind]
    layer, params, _ = _setup(factory, (3, 20), seed=9)
    features = layer.in_features
    x = torch.randn(3, tokens, features, dtype=torch.float64)
    per_sample = vmap(grad(_loss(layer)), in_dims=(None, 0))(params, x)
    expected = [_autograd_grads(layer, x[i]) for i in range(3)]
    _assert_close_dicts(per_sample, {k: torch.stack([e[k] for e in expected]) for k in expected[0]})


@LAYERS
def test_grad_of_grad_matches_autograd_or_is_refused(name, factory, shape):
    """An input-gradient penalty's gradient (reverse over reverse) as torch.autograd computes it;
    a backward that cannot be differentiated refuses by name."""
    layer, params, x = _setup(factory, shape, seed=5)
    loss = _loss(layer)

    def penalty(params, x):
        return grad(loss, argnums=1)(params, x).square().sum()
    if name not in DIFFERENTIABLE_TWICE:
        with pytest.raises(RuntimeError, match="is differentiable once"):
            grad(penalty)(params, x)
        return
    grads = grad(penalty)(params, x)
    xr = x.clone().requires_grad_()
    dx, = torch.autograd.grad(layer(xr).sin().sum(), xr, create_graph=True)
    layer.zero_grad(set_to_none=True)
    dx.square().sum().backward()
    _assert_close_dicts(grads, {k: v.grad for k, v in layer.named_parameters() if v.requires_grad})


FORWARD_MODE = pytest.mark.filterwarnings(  # torch's first jvp compiles its decompositions
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@FORWARD_MODE
@LAYERS
def test_forward_mode_matches_reverse_mode(name, factory, shape):
    """jvp, forward_ad's dual tensors and jacfwd (in the input and in every parameter) against the
    Jacobians reverse mode gives; the straight-through 2:4 mode refuses by name."""
    layer, params, x = _setup(factory, shape, seed=10)
    x = x[:1]
    t = torch.randn_like(x)
    names = list(params)

    def run(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x,))
    if name == "semi_dynamic":
        with pytest.raises(RuntimeError, match="semi_linear_dynamic has no forward-mode derivative"):
            torch.func.jvp(layer, (x,), (t,))
        return
    reverse = jacrev(run, argnums=tuple(range(len(names) + 1)))(x, *params.values())
    forward = torch.func.jacfwd(run, argnums=tuple(range(len(names) + 1)))(x, *params.values())
    for actual, wanted in zip(forward, reverse):
        torch.testing.assert_close(actual, wanted)
    expected = torch.tensordot(reverse[0], t, dims=t.dim())  # J t
    _, jvp_out = torch.func.jvp(layer, (x,), (t,))
    torch.testing.assert_close(jvp_out, expected)
    with forward_ad.dual_level():
        dual = layer(forward_ad.make_dual(x, t))
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, expected)


@FORWARD_MODE
@LAYERS
def test_hessian_matches_autograd(name, factory, shape):
    """torch.func.hessian (forward over reverse) in the input and in the weights against
    torch.autograd.functional.hessian (reverse over reverse); the straight-through 2:4 mode refuses."""
    layer, params, x = _setup(factory, shape, seed=11)
    x = x[:1]
    loss = _loss(layer)
    if name not in DIFFERENTIABLE_TWICE:
        with pytest.raises(RuntimeError, match="has no forward-mode derivative"):
            torch.func.hessian(loss, argnums=1)(params, x)
        return
    torch.testing.assert_close(torch.func.hessian(loss, argnums=1)(params, x),
                               torch.autograd.functional.hessian(lambda x: loss(params, x), x))
    names = list(params)

    def of_values(*values):
        return loss(dict(zip(names, values)), x)
    expected = torch.autograd.functional.hessian(of_values, tuple(params.values()))
    actual = torch.func.hessian(of_values, argnums=tuple(range(len(names))))(*params.values())
    for row_actual, row_expected in zip(actual, expected):
        for a, e in zip(row_actual, row_expected):
            torch.testing.assert_close(a, e)


@FORWARD_MODE
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dlrt_mode_gives_the_k_and_l_gradients_under_grad(kind):
    """In DLRT's K/L-gradient mode torch.func.grad hands back what backward() would (dW V, dWᵀ U);
    a second derivative and forward mode are refused by name."""
    torch.manual_seed(6)
    if kind == "linear":
        layer, x = sk.LowRankLinear(20, 12, 3).double(), torch.randn(4, 20, dtype=torch.float64)
    else:
        layer, x = sk.LowRankConv2d(6, 8, 3, 3, padding=1).double(), torch.randn(2, 6, 5, 5, dtype=torch.float64)
    DLRT(layer, 0.1, tol=0.1)
    assert layer.kl_grads
    params = {k: v.detach() for k, v in layer.named_parameters()}
    _assert_close_dicts(grad(_loss(layer))(params, x), _autograd_grads(layer, x))
    with pytest.raises(RuntimeError, match="DLRT mode.*differentiable once"):
        grad(lambda p: grad(_loss(layer))(p, x)["U"].sum())(params)
    with pytest.raises(RuntimeError, match="DLRT mode.*has no forward-mode derivative"):
        torch.func.jvp(layer, (x,), (torch.ones_like(x),))


@FORWARD_MODE
@pytest.mark.usefixtures("interpreter")
def test_per_sample_gradients_on_the_triton_kernels():
    """The Triton backend (interpreted on CPU) under vmap of grad, fp32, against autograd per sample,
    and under jvp."""
    torch.manual_seed(7)
    layer = sk.SparseLinear.from_dense(nn.Linear(32, 32), block_size=16,
                                       block_mask=torch.tensor([[True, False], [True, True]]))
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 32)
    with sk.use_backend("triton"):
        per_sample = vmap(grad(_loss(layer)), in_dims=(None, 0))(params, x.unsqueeze(1))
    for i in range(3):
        _assert_close_dicts({k: v[i] for k, v in per_sample.items()}, _autograd_grads(layer, x[i:i + 1]))
    t = torch.randn_like(x)
    with sk.use_backend("triton"):
        _, forward = torch.func.jvp(layer, (x,), (t,))
    torch.testing.assert_close(forward, t @ layer.to_dense().weight.T)


def test_empty_batch_under_vmap():
    layer = sk.SparseLinear(16, 8, block_size=4, density=0.5)
    assert vmap(layer)(torch.randn(0, 3, 16)).shape == (0, 3, 8)
    assert vmap(grad(lambda x: layer(x).sum()))(torch.randn(0, 3, 16)).shape == (0, 3, 16)


@pytest.mark.parametrize("case", ["whole_block_rows", "groups", "partial_block_row"])
def test_per_sample_gradients_of_a_cnn(case):
    """Per-sample gradients of two sparse convolutions, two images a sample, in the weights and the
    input: the inner layer's dX and dW together (its input gradient folds the samples into the
    images, its dW runs the samples as groups of one convolution), the outer one's dW alone; with
    output channels that end in a partial block row, one kernel call per sample instead."""
    torch.manual_seed(12)
    groups, out = (2, 12) if case == "groups" else (1, 10 if case == "partial_block_row" else 12)
    grid = (4, 4 // groups)
    mask = (torch.arange(grid[0])[:, None] + torch.arange(grid[1])) % 3 != 0  # every block row stores a block
    inner = sk.SparseConv2d.from_dense(nn.Conv2d(16, 16, 3, padding=1, groups=groups), block_size=4, block_mask=mask)
    model = nn.Sequential(inner, nn.ReLU(), sk.SparseConv2d(16, out, 3, stride=2, block_size=4, density=0.6)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 2, 16, 6, 6, dtype=torch.float64)
    per_sample, dx = vmap(grad(_loss(model), argnums=(0, 1)), in_dims=(None, 0))(params, x)
    for i in range(3):
        xi = x[i].clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        model(xi).sin().sum().backward()
        _assert_close_dicts({k: v[i] for k, v in per_sample.items()}, {k: v.grad for k, v in model.named_parameters()})
        torch.testing.assert_close(dx[i], xi.grad)


def _two_structures(kind):
    """Two layers of one shape and block count on different masks."""
    torch.manual_seed(13)
    if kind == "linear":
        make = lambda: sk.SparseLinear(32, 32, block_size=8, density=0.5)  # noqa: E731
        x = torch.randn(3, 32)
    else:
        make = lambda: sk.SparseConv2d(16, 16, 3, padding=1, block_size=8, density=0.5)  # noqa: E731
        x = torch.randn(2, 16, 5, 5)
    first, second = make(), make()
    while torch.equal(first.block_mask, second.block_mask):
        second = make()
    assert first.nnz_blocks == second.nnz_blocks
    return first, second, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_functional_call_follows_the_block_mask_it_is_given(kind):
    """functional_call with another layer's state runs that layer (its values on its mask: the
    values used to run on the called layer's own mask); the same structure in another tensor (as
    a device move leaves it) is adopted; a vmap over stacked masks refuses by name."""
    first, second, x = _two_structures(kind)
    expected = first(x)
    other = functional_call(first, {**dict(second.named_parameters()), **dict(second.named_buffers())}, (x,))
    torch.testing.assert_close(other, second(x))
    assert first.block_mask is first.layout().block_mask and not torch.equal(first.block_mask, second.block_mask)
    torch.testing.assert_close(first(x), expected)
    first.block_mask = first.block_mask.clone()
    torch.testing.assert_close(first(x), expected)
    assert first.block_mask is first.layout().block_mask
    params, buffers = stack_module_state([first, second])
    with pytest.raises(ValueError, match="vmap over stacked block masks"):
        vmap(lambda p, b: functional_call(first, (p, b), (x,)))(params, buffers)


@pytest.mark.filterwarnings("ignore:.*stores no block:UserWarning")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_per_sample_gradients_of_a_layer_storing_no_block(kind):
    empty = torch.zeros(2, 2, dtype=torch.bool)
    if kind == "linear":
        layer = sk.SparseLinear.from_dense(nn.Linear(8, 8), block_size=4, block_mask=empty)
        x = torch.randn(3, 1, 8)
    else:
        layer = sk.SparseConv2d.from_dense(nn.Conv2d(8, 8, 3), block_size=4, block_mask=empty)
        x = torch.randn(3, 1, 8, 5, 5)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    per_sample = vmap(grad(_loss(layer)), in_dims=(None, 0))(params, x)
    assert per_sample["values"].shape == (3, *layer.values.shape)
    for i in range(3):
        torch.testing.assert_close(per_sample["bias"][i], _autograd_grads(layer, x[i])["bias"])


@FORWARD_MODE
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gpu_per_sample_gradients_and_jvp(kind, monkeypatch):
    """On a GPU (the Triton kernels, autotuned): per-sample gradients against one backward per
    sample, and jvp against the dense layer's."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(14)
    if kind == "linear":
        layer, x = sk.SparseLinear(256, 192, block_size=32, density=0.5), torch.randn(4, 3, 256)
    else:
        layer, x = sk.SparseConv2d(64, 96, 3, padding=1, block_size=32, density=0.5), torch.randn(4, 2, 64, 8, 8)
    layer, x = layer.cuda(), x.cuda()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    per_sample = vmap(grad(_loss(layer)), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        expected = _autograd_grads(layer, x[i])
        for key in expected:
            torch.testing.assert_close(per_sample[key][i], expected[key], rtol=1e-2, atol=1e-3)  # TF32 may be on
    t = torch.randn_like(x[0])
    _, forward = torch.func.jvp(layer, (x[0],), (t,))
    torch.testing.assert_close(forward, torch.func.jvp(layer.to_dense(), (x[0],), (t,))[1], rtol=1e-2, atol=1e-3)
