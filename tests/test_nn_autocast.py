"""Every sparse layer behaves as nn.Linear does under torch.autocast (CPU bf16): low-precision
output, low-precision input accepted, fp32 master weights receiving their gradients."""
import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.cli.models import training_state_mb


def _layers():
    torch.manual_seed(0)
    return {
        "bsr": sk.SparseLinear(64, 48, block_size=16, density=0.5),
        "bsr-padded": sk.SparseLinear(60, 45, block_size=16, density=0.5),
        "semi-static": sk.SemiSparseLinear(64, 48),
        "semi-dynamic": sk.SemiSparseLinear(64, 48, mode="dynamic"),
        "lowrank": sk.LowRankLinear(64, 48, 8),
    }


@pytest.mark.parametrize("name", list(_layers()))
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_matches_nn_linear(name, input_dtype):
    layer = _layers()[name]
    dense = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        weight = layer.dense_weight().detach()
        if name == "semi-dynamic":  # re-pruned in bf16: the kept set is the bf16 weight's
            weight = layer.weight.detach() * sk.prune_2to4(layer.weight.detach().bfloat16(), transposable=True)
        dense.weight.copy_(weight)
        dense.bias.copy_(layer.bias)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1)).to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(x), dense(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    for param in layer.parameters():
        assert param.dtype == torch.float32 and param.grad is not None and param.grad.dtype == torch.float32


def test_outside_autocast_a_dtype_mismatch_is_still_refused():
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16 but the weight has dtype torch.float32"):
        sk.SparseLinear(64, 48, block_size=16)(torch.randn(2, 64).bfloat16())


def test_a_dst_probe_step_runs_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(sk.SparseLinear(64, 64, block_size=16, density=0.5), nn.ReLU(),
                          sk.SparseLinear(64, 10, block_size=16, density=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = sk.methods.RigL(model, opt, density=0.5, delta=1, t_end=10, score_method="product")
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(8, 64)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert rigl.step()


def _training_bytes(layer, optimizer):
    """The CLI's training state (parameters, gradients, optimizer state) plus the layer's buffers
    and its block layout's index tensors (the structure's metadata)."""
    layout = getattr(layer, "_layout", None)
    indices = [] if layout is None else [t for t in vars(layout).values() if torch.is_tensor(t)]
    buffers = [b for b in layer.buffers() if all(b is not t for t in indices)]
    return training_state_mb(layer, optimizer) * 2 ** 20 + sum(t.numel() * t.element_size() for t in buffers + indices)


# name: (sparse layer, the dense one of the same shape, input shape)
_STATE_CASES = {
    "linear-block32": (lambda d, dt: sk.SparseLinear(1024, 1024, block_size=32, density=d, dtype=dt),
                       lambda dt: nn.Linear(1024, 1024, dtype=dt), (4, 1024)),
    "linear-block16": (lambda d, dt: sk.SparseLinear(512, 512, block_size=16, density=d, dtype=dt),
                       lambda dt: nn.Linear(512, 512, dtype=dt), (4, 512)),
    "conv-block32": (lambda d, dt: sk.SparseConv2d(128, 128, 3, padding=1, block_size=32, density=d, dtype=dt),
                     lambda dt: nn.Conv2d(128, 128, 3, padding=1, dtype=dt), (2, 128, 5, 5)),
    "conv-block16": (lambda d, dt: sk.SparseConv2d(128, 128, 3, padding=1, block_size=16, density=d, dtype=dt),
                     lambda dt: nn.Conv2d(128, 128, 3, padding=1, dtype=dt), (2, 128, 5, 5)),
}


@pytest.mark.filterwarnings("ignore:.*store no block")  # small grids at density 0.1: expected
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("density", [0.5, 0.1])
@pytest.mark.parametrize("name", list(_STATE_CASES))
def test_training_state_of_a_sparse_layer_is_its_density_of_dense(name, dtype, density):
    make_sparse, make_dense, input_shape = _STATE_CASES[name]

    def trained(layer):
        optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
        layer(torch.randn(input_shape, dtype=dtype)).float().sum().backward()
        optimizer.step()
        return _training_bytes(layer, optimizer)

    sparse, dense = trained(make_sparse(density, dtype)), trained(make_dense(dtype))
    assert sparse <= (density + 0.05) * dense, f"{sparse} bytes vs {dense} dense at density {density}"
