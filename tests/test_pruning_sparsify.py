import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

import sparsekern as sk
from sparsekern.methods import block_scores, compute_block_masks, erk_densities, expand_block_mask, global_magnitude_mask
from sparsekern.methods.pruning.sparsify import custom_forward_names

METHODS = ["uniform", "er", "erk", "random", "magnitude", "snip", "grasp", "synflow"]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 40, generator=g), torch.randint(0, 10, (16,), generator=g)


@pytest.mark.parametrize("method", METHODS)
def test_sparsify_replaces_linears_and_matches_masked_dense(method):
    dense = _mlp()
    x, y = _batch()
    model = sk.sparsify(copy.deepcopy(dense), density=0.3, method=method, block_size=8, inputs=x, targets=y,
                        synflow_iterations=10)
    layers = [m for m in model if isinstance(m, sk.SparseLinear)]
    assert len(layers) == 3 and not any(isinstance(m, nn.Linear) for m in model)
    cells = sum(layer.block_mask.numel() for layer in layers)
    kept = sum(layer.nnz_blocks for layer in layers)
    assert abs(kept - 0.3 * cells) <= 3  # rounding per layer
    # The sparse model computes the dense model with the masked weights.
    expected = x
    for d, s in zip(dense, model):
        if isinstance(d, nn.Linear):
            mask = expand_block_mask(s.block_mask, 8, d.weight.shape)
            expected = F.linear(expected, d.weight * mask, d.bias)
        else:
            expected = d(expected)
    torch.testing.assert_close(model(x), expected)


def test_erk_uses_erk_densities():
    model = sk.sparsify(_mlp(), density=0.25, method="erk", block_size=8)
    expected = erk_densities([(48, 40), (48, 48), (10, 48)], 0.25)
    for layer, d in zip([m for m in model if isinstance(m, sk.SparseLinear)], expected):
        assert layer.nnz_blocks == round(d * layer.block_mask.numel())


def test_magnitude_global_share_then_largest_blocks_per_layer():
    dense = _mlp()
    masks = compute_block_masks(dense, density=0.2, method="magnitude", block_size=8)
    weights = [dense[i].weight.detach() for i in (0, 2, 4)]
    shares = global_magnitude_mask(weights, 0.8)  # element-level global ranking sets each layer's share
    for w, share, name in zip(weights, shares, ("0", "2", "4")):
        scores, kept = block_scores(w.abs(), 8).flatten(), masks[name].flatten()
        assert int(kept.sum()) == round(float(share.float().mean()) * kept.numel())
        if kept.any() and (~kept).any():
            assert scores[kept].min() >= scores[~kept].max()


def test_global_scores_do_not_collapse_a_layer():
    # Layer 2 has a smaller init scale, so ranking block norms across layers would give it nothing.
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(0.7)
    masks = compute_block_masks(model, density=0.3, method="magnitude", block_size=8)
    assert all(m.any() for m in masks.values())


def test_dense_layers_and_allocation():
    model = sk.sparsify(_mlp(), density=0.5, method="snip", block_size=8, dense_layers=["4"], allocation="uniform",
                        inputs=_batch()[0], targets=_batch()[1])
    assert isinstance(model[4], nn.Linear)
    assert model[0].density == pytest.approx(0.5, abs=0.05) and model[2].density == pytest.approx(0.5, abs=0.05)


def test_unstructured_block_one():
    model = sk.sparsify(_mlp(), density=0.1, method="magnitude", block_size=1)
    assert model[0].block_size == (1, 1)
    assert sum(m.nnz_blocks for m in model if isinstance(m, sk.SparseLinear)) == round(0.1 * (40 * 48 + 48 * 48 + 480))


def test_sparse_model_trains():
    model = sk.sparsify(_mlp(), density=0.3, method="erk", block_size=8)
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(density=0.1, method="bogus"), ValueError, "unknown method"),
    (dict(density=0.1, method="magnitude", allocation="bogus"), ValueError, "unknown allocation"),
    (dict(density=1.5), ValueError, "density"),
    (dict(density=0.1, method="snip"), ValueError, "inputs="),
    (dict(density=0.1, dense_layers=["nope"]), ValueError, "dense layer"),
    (dict(density=0.1, dense_layers=[7]), ValueError, "out of range"),
    (dict(density=0.01, method="magnitude", dense_layers=[1]), ValueError, "below"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        sk.sparsify(_mlp(), block_size=8, **kwargs)


def test_no_linear():
    with pytest.raises(ValueError, match="no nn.Linear"):
        sk.sparsify(nn.ReLU(), density=0.5)


def test_a_layer_used_twice_becomes_one_sparse_layer():
    linear = nn.Linear(64, 64)
    model = nn.Sequential(linear, nn.ReLU(), linear)
    sk.sparsify(model, density=0.5, block_size=16)
    assert isinstance(model[0], sk.SparseLinear) and model[0] is model[2]


def test_tied_weights_stay_tied_and_dense_with_a_warning():
    embedding = nn.Embedding(100, 64)
    head = nn.Linear(64, 100, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict(dict(embedding=embedding, body=nn.Linear(256, 256), head=head))
    with pytest.warns(UserWarning, match=r"leaving \['head'\] dense: their weights are tied"):
        sk.sparsify(model, density=0.5, block_size=16)
    assert type(model["head"]) is nn.Linear and model["head"].weight is model["embedding"].weight
    assert isinstance(model["body"], sk.SparseLinear)


def test_densify_round_trips_every_sparse_layer_kind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 24),
                          nn.ReLU(), nn.Linear(24, 8))
    sk.sparsify(model, density=0.7, block_size=16, dense_layers=[1, 2, 3])
    model[2] = sk.SemiSparseLinear.from_dense(model[2])
    model[4] = sk.LowRankLinear.from_dense(model[4], rank=6)
    model[6] = sk.methods.PartiallyTrainableLinear.from_dense(model[6], torch.tensor([[True, False]]), block_size=16)
    with torch.no_grad():
        model[6].delta.values.normal_()  # trained deltas on the frozen weight
    x = torch.randn(5, 40)
    expected = model(x)
    dense = sk.densify(model)
    assert dense is model and all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in dense.modules())
    torch.testing.assert_close(dense(x), expected, rtol=1e-5, atol=1e-5)
    reference = nn.Sequential(*(type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
                                for m in dense))
    reference.load_state_dict(dense.state_dict())  # a dense checkpoint of the same architecture
    torch.testing.assert_close(reference(x), expected, rtol=1e-5, atol=1e-5)


def _encoder():
    torch.manual_seed(4)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # torch's fused path
@pytest.mark.parametrize("convert", [sk.sparsify, sk.methods.freeze], ids=["sparsify", "freeze"])
def test_torch_transformer_encoder_trains_and_infers_after_conversion(convert):
    """nn.MultiheadAttention's out_proj stays dense (its forward reads the weight), the feed-forward
    linears convert, and torch's fused inference paths (which read linear1.weight) are off until
    densify makes them dense again: then the fused path gives what the converted model gave."""
    model = _encoder()
    x = torch.randn(3, 7, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    with pytest.warns(UserWarning, match=r"leaving \['layers.0.self_attn.out_proj', 'layers.1.self_attn.out_proj'\] "
                                         "dense: nn.MultiheadAttention reads its out_proj weight itself"):
        convert(model, density=0.5, block_size=8)
    layer = model.layers[0]
    assert isinstance(layer.self_attn.out_proj, nn.Linear) and not isinstance(layer.linear1, nn.Linear)
    model(x, src_key_padding_mask=padding).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        plain, padded = model(x), model(x, src_key_padding_mask=padding)
    dense = sk.densify(copy.deepcopy(model))
    assert dense.layers[0].activation_relu_or_gelu == 1 and dense.use_nested_tensor
    with torch.no_grad():
        torch.testing.assert_close(dense(x), plain, rtol=1e-4, atol=1e-5)
        # the fused path leaves padded positions zero: compare the others
        torch.testing.assert_close(dense(x, src_key_padding_mask=padding)[~padding], padded[~padding],
                                   rtol=1e-4, atol=1e-5)


def test_torch_transformer_decoder_layer_trains_after_sparsify():
    torch.manual_seed(5)
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match=r"\['self_attn.out_proj', 'multihead_attn.out_proj'\] dense"):
        sk.sparsify(layer, density=0.5, block_size=8)
    assert isinstance(layer.linear1, sk.SparseLinear) and isinstance(layer.linear2, sk.SparseLinear)
    target, memory = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    layer(target, memory).square().sum().backward()
    assert layer.linear1.values.grad is not None
    layer.eval()
    with torch.no_grad():
        assert layer(target, memory).shape == (2, 5, 32)


@pytest.mark.parametrize("method", METHODS)
def test_parametrized_layers_stay_dense_with_a_warning(method):
    """A weight computed by torch.nn.utils.parametrize (weight_norm here) is no parameter to sparsify:
    the layer stays as it is, named in a warning, and every method still scores and converts the rest
    (the weight used to crash the tie check with a KeyError, and the scores' autograd)."""
    torch.manual_seed(6)
    model = _mlp()
    nn.utils.parametrizations.weight_norm(model[2])
    x, y = _batch()
    with pytest.warns(UserWarning, match=r"leaving \['2'\] dense: their weights are computed"):
        sk.sparsify(model, density=0.5, method=method, block_size=8, inputs=x, targets=y, synflow_iterations=3)
    assert parametrize.is_parametrized(model[2], "weight")
    assert isinstance(model[0], sk.SparseLinear) and isinstance(model[4], sk.SparseLinear)
    F.cross_entropy(model(x), y).backward()
    assert model[2].parametrizations.weight.original1.grad is not None


def test_freeze_leaves_a_parametrized_convolution_dense():
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(16, 16, 3)), nn.ReLU(),
                          nn.Conv2d(16, 16, 3))
    with pytest.warns(UserWarning, match=r"leaving \['0'\] dense: their weights are computed"):
        sk.methods.freeze(model, density=0.5, block_size=8)
    assert parametrize.is_parametrized(model[0], "weight")
    assert isinstance(model[2], sk.nn.PartiallyTrainableConv2d)
    model(torch.randn(2, 16, 9, 9)).sum().backward()


def test_a_layer_pruned_by_torch_stays_dense_until_its_pruning_is_made_permanent():
    torch.manual_seed(7)
    for permanent in (False, True):
        model = _mlp()
        prune.random_unstructured(model[0], "weight", 0.5)
        if permanent:
            prune.remove(model[0], "weight")
            sk.sparsify(model, density=0.5, block_size=8)
            assert isinstance(model[0], sk.SparseLinear)
            continue
        with pytest.warns(UserWarning, match=r"leaving \['0'\] dense: .*prune.remove"):
            sk.sparsify(model, density=0.5, block_size=8)
        assert type(model[0]) is nn.Linear and isinstance(model[2], sk.SparseLinear)


def test_uninitialized_lazy_layers_are_a_clear_error():
    model = nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"lazy layers \['0'\] have no weights yet; run one forward pass"):
        sk.sparsify(model, density=0.5, block_size=16)
    model(torch.randn(2, 40))
    sk.sparsify(model, density=0.5, block_size=16)
    assert isinstance(model[0], sk.SparseLinear) and model[0].in_features == 40


def test_frozen_weights_and_biases_stay_frozen_through_every_conversion():
    """requires_grad=False on a weight or a bias survives sparsify, densify, freeze and every
    from_dense (it was reset to True: a frozen backbone trained after sparsify)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Conv2d(16, 16, 3))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model[3].weight.requires_grad_(False)
    expected = [{k: p.requires_grad for k, p in model[i].named_parameters()} for i in (0, 2, 3)]

    def flags(m):
        return [{k.replace("values", "weight"): p.requires_grad for k, p in m[i].named_parameters()} for i in (0, 2, 3)]
    sk.sparsify(model, density=0.5, block_size=16)
    assert all(isinstance(model[i], (sk.SparseLinear, sk.SparseConv2d)) for i in (0, 2, 3))
    assert flags(model) == expected
    sk.densify(model)
    assert flags(model) == expected
    frozen_linear, frozen_bias = nn.Linear(64, 64).requires_grad_(False), nn.Conv2d(16, 16, 3)
    frozen_bias.bias.requires_grad_(False)
    for layer in (sk.SemiSparseLinear.from_dense(frozen_linear), sk.SemiSparseLinear.from_dense(frozen_linear,
                  mode="dynamic"), sk.LowRankLinear.from_dense(frozen_linear, rank=4),
                  sk.nn.PartiallyTrainableLinear.from_dense(frozen_linear, torch.ones(4, 4, dtype=torch.bool),
                                                            block_size=16)):
        assert not any(p.requires_grad for p in layer.parameters()), type(layer).__name__
    for layer in (sk.LowRankConv2d.from_dense(frozen_bias, rank=2),
                  sk.nn.PartiallyTrainableConv2d(frozen_bias, torch.ones(1, 1, dtype=torch.bool), block_size=16)):
        assert {k: p.requires_grad for k, p in layer.named_parameters()} == {
            k: k != "bias" for k, _ in layer.named_parameters()}, type(layer).__name__
    frozen = nn.Sequential(nn.Linear(64, 64).requires_grad_(False))
    sk.methods.freeze(frozen, density=0.5, block_size=16)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_hooks_on_a_converted_layer_move_with_it():
    """Forward, forward-pre and full backward hooks registered on an nn.Linear keep running on the
    SparseLinear that replaces it, and on the nn.Linear densify makes of that; their handles
    still remove them."""
    torch.manual_seed(9)
    model = _mlp()
    seen = []
    handles = [model[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,)),
               model[0].register_forward_hook(lambda m, args, out: seen.append(("forward", type(m).__name__))),
               model[0].register_full_backward_hook(lambda m, gin, gout: seen.append(("backward", type(m).__name__)))]
    x = _batch()[0].requires_grad_()  # a full backward hook wants an input gradient
    expected = model[2](model[1](model[0](x)))
    sk.sparsify(model, density=1.0, block_size=8)
    torch.testing.assert_close(model[2](model[1](model[0](x))), expected, rtol=1e-5, atol=1e-5)
    model(x).sum().backward()
    assert ("forward", "SparseLinear") in seen and ("backward", "SparseLinear") in seen
    sk.densify(model)
    seen.clear()
    model(x).sum().backward()
    assert seen == [("forward", "Linear"), ("backward", "Linear")]
    for handle in handles:
        handle.remove()
    seen.clear()
    torch.testing.assert_close(model[0](x), F.linear(x, model[0].weight, model[0].bias))
    model(x).sum().backward()
    assert seen == []


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _PaddedConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(F.pad(x, (1, 1, 1, 1)), weight, bias)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_subclasses_that_compute_something_else_stay_dense(kind):
    """A subclass overriding forward (or a convolution's _conv_forward) would silently lose its
    computation in a sparse layer: it stays, named in a warning; subclasses that only add to
    nn.Linear (nn.MultiheadAttention's out_proj class) are not held back by this rule."""
    torch.manual_seed(10)
    if kind == "linear":
        model, x = nn.Sequential(_ScaledLinear(16, 16), nn.ReLU(), nn.Linear(16, 16)), torch.randn(3, 16)
    else:
        model, x = nn.Sequential(_PaddedConv(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), torch.randn(2, 8, 6, 6)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"leaving \['0'\] dense: their classes override"):
        sk.sparsify(model, density=1.0, block_size=8)
    assert type(model[0]) in (_ScaledLinear, _PaddedConv) and not isinstance(model[2], (nn.Linear, nn.Conv2d))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert not custom_forward_names(nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8)))
