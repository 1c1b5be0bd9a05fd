"""Training state of the block-sparse layers: weights, their gradients, Adam's two moments and the
structure's own tensors take at most density + 5 % of the dense layer's, in fp32 and in bf16."""
import dataclasses

import pytest
import torch
from torch import nn

import sparsekern as sk


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _training_state_bytes(layer, x):
    """Parameters, gradients and Adam state after one step, plus buffers and the block layout's indices."""
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(x).float().square().mean().backward()
    optimizer.step()
    params = list(layer.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    layout = getattr(layer, "_layout", None)
    indices = [] if layout is None else [getattr(layout, f.name) for f in dataclasses.fields(layout)
                                          if torch.is_tensor(getattr(layout, f.name))]
    buffers = [b for b in layer.buffers() if all(b is not t for t in indices)]
    return _bytes(params) + _bytes([p.grad for p in params]) + _bytes(state) + _bytes(buffers + indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block, density", [(32, 0.1), (32, 0.5), (16, 0.1)])
def test_sparse_linear_training_state_is_within_density_plus_5_percent(dtype, block, density):
    dense = nn.Linear(512, 512, dtype=dtype)
    sparse = sk.SparseLinear.from_dense(dense, block_size=block, density=density)
    x = torch.randn(8, 512, dtype=dtype)
    ratio = _training_state_bytes(sparse, x) / _training_state_bytes(dense, x)
    assert ratio <= sparse.density + 0.05, (ratio, sparse.density)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block, density", [(32, 0.1), (16, 0.25)])
def test_sparse_conv2d_training_state_is_within_density_plus_5_percent(dtype, block, density):
    dense = nn.Conv2d(128, 128, 3, padding=1, dtype=dtype)
    sparse = sk.SparseConv2d.from_dense(dense, block_size=block, density=density)
    x = torch.randn(2, 128, 6, 6, dtype=dtype)
    ratio = _training_state_bytes(sparse, x) / _training_state_bytes(dense, x)
    assert ratio <= sparse.density + 0.05, (ratio, sparse.density)
