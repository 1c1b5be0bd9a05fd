"""The element-granularity DPF oracle (tests/dpf_oracle.py, MaskedDPF): masked forward,
straight-through gradient to every weight, mask = top |w| on the cubic schedule."""
import torch
import torch.nn.functional as F

from dpf_oracle import MaskedDPF
from sparsekern.methods import functional as Fn
from sparsekern.methods.dst.schedules import gradual_density


def test_masked_dpf_reference_prunes_by_magnitude_and_feeds_back_to_pruned_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = MaskedDPF(model, density=0.3, delta=2, t_end=10, ramp_end=4)
    assert len(ref.layers) == 2 and ref.stored_density() == 1.0  # the output layer stays dense
    g = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        masked = [(layer.parametrizations.weight.original * mask).detach().requires_grad_()
                  for layer, mask in zip(ref.layers, ref.masks)]
        h = F.relu(F.linear(F.relu(F.linear(x, masked[0], model[0].bias)), masked[1], model[2].bias))
        F.cross_entropy(model[4](h), y).backward()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for layer, w in zip(ref.layers, masked):  # the gradient at W ⊙ M reaches all of W, pruned entries too
            torch.testing.assert_close(layer.parametrizations.weight.original.grad, w.grad)
        opt.step()
        assert ref.step() == (step % 2 == 0)
        for layer, mask, target in zip(ref.layers, ref.masks, ref.targets):
            dense = layer.parametrizations.weight.original.detach()
            if step % 2 == 0:
                expected = Fn.dpf_mask(dense, gradual_density(step, target, t_end=4))
                assert torch.equal(mask, expected)
            assert torch.equal(layer.weight, dense * mask)
    assert abs(ref.stored_density() - 0.3) < 0.05
