"""DLRT on LowRankConv2d: the step on the (out, in·kh·kw) kernel matrix is the linear layer's
W - lr P_T(dW), and a LeNet5-like CNN of LowRankConv2d and LowRankLinear layers trains with
adapting ranks, optimizer state that follows them, and bit-exact resumption."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _conv_and_kernel_gradient(seed=0):
    """A fp64 stride-2 conv layer, an input, and the dense kernel gradient dW (out, in·kh·kw) of a loss."""
    torch.manual_seed(seed)
    layer = sk.LowRankConv2d(3, 7, 3, 3, stride=2, padding=1, dtype=F64)
    x, dy = torch.randn(4, 3, 9, 9, dtype=F64), torch.randn(4, 7, 5, 5, dtype=F64)
    weight = layer.dense_weight().detach().requires_grad_()
    F.conv2d(x, weight, layer.bias.detach(), layer.stride, layer.padding).backward(dy)
    return layer, x, dy, weight.grad.reshape(7, -1)


def test_one_step_is_the_projected_gradient_step_on_the_kernel_matrix():
    layer, x, dy, dW = _conv_and_kernel_gradient()
    U, S, V = (t.detach() for t in (layer.U, layer.S, layer.V))
    PU, PV = U @ U.T, V @ V.T
    expected = U @ S @ V.T - 0.3 * (PU @ dW + dW @ PV - PU @ dW @ PV)
    dlrt = sk.DLRT(layer, 0.3, tol=0.0, rmin=1)
    layer(x).backward(dy)
    dlrt.step()
    assert layer.rank == 6  # 2r, augmented basis
    torch.testing.assert_close(layer.dense_weight().detach().reshape(7, -1), expected, rtol=1e-10, atol=1e-10)
    U, V, eye = layer.U.detach(), layer.V.detach(), torch.eye(6, dtype=F64)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ V, eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,rank", [(dict(tol=0.0), 7), (dict(tol=1e9, absolute=True, rmin=2), 2),
                                         (dict(tol=0.0, rmax=5), 5)], ids=["capped-by-out", "rmin", "rmax"])
def test_rank_bounds_come_from_the_kernel_matrix(kwargs, rank):
    """7 output channels cap the rank of a 7 x 27 kernel matrix even though 2r = 8."""
    torch.manual_seed(0)
    layer = sk.LowRankConv2d(3, 7, 3, 4, dtype=F64)
    dlrt = sk.DLRT(layer, 0.5, **kwargs)
    layer(torch.randn(4, 3, 6, 6, dtype=F64)).square().sum().backward()
    dlrt.step()
    assert layer.rank == rank and layer.U.shape == (7, rank) and layer.V.shape == (27, rank)


def _lenet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        sk.LowRankConv2d(1, 6, 5, 6, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 6 x 16 x 16 -> 8 x 8
        sk.LowRankConv2d(6, 16, 5, 16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),  # 16 x 4 x 4 -> 2 x 2
        sk.LowRankLinear(64, 32, 24), nn.ReLU(), nn.Linear(32, 10))


def _prototype_images(n=256, seed=1):
    """Ten classes: a random 16 x 16 prototype each, plus noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, 16, 16, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return prototypes[labels] + 0.5 * torch.randn(n, 1, 16, 16, generator=g), labels


def _train(model, dlrt, x, labels, steps, first_step=0, each_step=lambda: None):
    losses = []
    for step in range(first_step, first_step + steps):
        batch = slice((step * 64) % len(x), (step * 64) % len(x) + 64)
        loss = F.cross_entropy(model(x[batch]), labels[batch])
        loss.backward()
        dlrt.step()
        dlrt.zero_grad()
        losses.append(loss.item())
        each_step()
    return losses


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.005)])
def test_lenet_trains_with_adapting_ranks(optimizer, lr):
    model = _lenet()
    dlrt = sk.DLRT(model, lr, tol=0.3, optimizer=optimizer)
    layers = [model[0], model[3], model[7]]
    assert dlrt.layers == layers and all(layer.kl_grads for layer in layers)
    start = dlrt.ranks()

    def check_factors_and_state():
        for layer in layers:
            r, U, V = layer.rank, layer.U.detach(), layer.V.detach()
            eye = torch.eye(r)
            assert float((U.T @ U - eye).abs().max()) < 1e-5 and float((V.T @ V - eye).abs().max()) < 1e-5
            if optimizer == "adam":
                shapes = {n: {tuple(t.shape) for t in dlrt.state[(layer, n)]} for n in "KLS"}
                assert shapes == {"K": {tuple(layer.U.shape)}, "L": {tuple(layer.V.shape)}, "S": {(r, r)}}

    x, labels = _prototype_images()
    losses = _train(model, dlrt, x, labels, 30, each_step=check_factors_and_state)
    ranks = dlrt.ranks()
    assert ranks[1] < start[1] and ranks[2] < start[2], (start, ranks)
    assert all(2 <= r for r in ranks)
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.005)])
def test_resume_from_a_checkpoint_is_bit_exact(optimizer, lr, tmp_path):
    x, labels = _prototype_images(128)
    straight = _lenet()
    straight_dlrt = sk.DLRT(straight, lr, tol=0.3, optimizer=optimizer)
    _train(straight, straight_dlrt, x, labels, 8)

    first = _lenet()
    first_dlrt = sk.DLRT(first, lr, tol=0.3, optimizer=optimizer)
    _train(first, first_dlrt, x, labels, 4)
    assert first_dlrt.ranks() != [6, 16, 24]  # the checkpoint holds changed ranks
    torch.save({"model": first.state_dict(), "dlrt": first_dlrt.state_dict()}, tmp_path / "ckpt.pt")
    resumed = _lenet(seed=7)
    resumed_dlrt = sk.DLRT(resumed, lr, tol=0.3, optimizer=optimizer)
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(checkpoint["model"])
    resumed_dlrt.load_state_dict(checkpoint["dlrt"])
    assert resumed_dlrt.ranks() == first_dlrt.ranks()
    _train(resumed, resumed_dlrt, x, labels, 4, first_step=4)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_model_without_low_rank_layers_is_refused():
    with pytest.raises(ValueError, match="no sparsekern.LowRankLinear or LowRankConv2d layer"):
        sk.DLRT(nn.Conv2d(3, 3, 3), 0.1, tol=0.1)
