"""The networks ``sparsekern train`` compares: a dense MLP or CNN and its sparse (or low-rank) twin.

Both start from the same dense initialisation (same seed). Block methods convert every
nn.Linear and nn.Conv2d with ``sparsify`` (random blocks at ERK densities; kept values scaled by
density**-0.5, except for DPF, which starts dense; the CNN's one-channel stem stays dense) and,
except "static", hand the model to the dynamic-sparse-training driver of the method; "2:4" and
"lowrank" convert each layer where the format applies (2:4: linear layers whose feature counts
are multiples of 4; low-rank: linear and conv layers where rank r stores fewer weights than the
dense layer) and leave the others dense.
"""
import warnings

import torch
from torch import nn

from .. import methods
from ..methods import sparsify
from ..nn import LowRankConv2d, LowRankLinear, SemiSparseLinear, SparseConv2d, SparseLinear

DRIVERS = {"rigl": methods.RigL, "set": methods.SET, "snfs": methods.SNFS, "ggr": methods.GGR,
           "topkast": methods.TopKAST, "dpf": methods.DPF}
BLOCK_METHODS = ("static", *DRIVERS)
METHODS = (*BLOCK_METHODS, "2:4", "lowrank")
MODELS = ("mlp", "cnn")
CNN_METHODS = (*BLOCK_METHODS, "lowrank")  # 2:4 has no convolution layer


def build(model, data, width, seed):
    """The dense ``model`` ("mlp" or "cnn") for ``data``; ``width``: H of the MLP, the CNN's first width."""
    if model == "cnn":
        return cnn(data.image_side, width, data.classes, seed)
    return mlp(data.features, width, data.classes, seed)


def describe_model(model, data, width):
    if model == "cnn":
        return (f"CNN on 1x{data.image_side}x{data.image_side} images, 3x3 convs {width}-{width}-{width}, "
                f"pool, {2 * width}-{2 * width}, {data.classes} classes")
    return f"MLP {data.features}-{width}-{width}-{data.classes}"


def family(method, model="mlp"):
    """The kernel family a method's layers run on (the CNN's block layers: conv)."""
    return {"2:4": "semi", "lowrank": "lowrank"}.get(method, "conv" if model == "cnn" else "bsr")


def mlp(features, hidden, classes, seed):
    """features -> hidden -> hidden -> classes, ReLU between (the hidden x hidden layer dominates)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


class ChannelsLast(nn.Module):
    """Hands the convolutions channels-last activations (their fast memory format, dense and sparse).

    Placed after a one-channel stem conv, not before it: a one-channel image is plain contiguous
    and channels-last at once, and F.conv2d then returns NCHW, which every later layer would keep."""

    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


def cnn(side, width, classes, seed):
    """A VGG-style CNN on flat (side * side) images: a one-channel stem to ``width`` channels, two
    3x3 convs at ``width``, 2x2 max-pool, two 3x3 convs at 2 x ``width`` (each conv followed by
    batch norm and ReLU), global average pool, a linear classifier. The width x width and
    2width x 2width convs hold nearly all the work."""
    torch.manual_seed(seed)
    w = width
    layers = [nn.Unflatten(1, (1, side, side))]
    for index, (c_in, c_out) in enumerate([(1, w), (w, w), (w, w), (w, 2 * w), (2 * w, 2 * w)]):
        if index == 3:
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
        if index == 0:
            layers.append(ChannelsLast())
        # Batch norm: without it this 5-conv stack barely trains at nn.Conv2d's default init.
        layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, classes))


def _replace(model, kinds, convert):
    for name, module in list(model.named_children()):
        if isinstance(module, kinds):
            new = convert(module)
            if new is not None:
                setattr(model, name, new)
        else:
            _replace(module, kinds, convert)
    return model


def _low_rank(module, rank):
    """A low-rank twin of a Linear or Conv2d layer where rank r stores fewer weights, else None."""
    if isinstance(module, nn.Linear):
        if rank * (module.in_features + module.out_features) < module.in_features * module.out_features:
            return LowRankLinear.from_dense(module, rank=rank)
        return None
    rows, cols = module.out_channels, module.weight[0].numel()
    if module.groups == 1 and rank * (rows + cols) < rows * cols:
        return LowRankConv2d.from_dense(module, rank=rank)
    return None


def sparse_model(model, method, *, density, block_size, rank):
    """Convert the dense ``model`` in place for ``method`` and return it."""
    if method in BLOCK_METHODS:
        with warnings.catch_warnings():  # the CNN's one-channel stem stays dense: describe_layers says so
            warnings.filterwarnings("ignore", message="sparsify: leaving the convolutions")
            model = sparsify(model, density=density, method="erk", block_size=block_size)
        if method != "dpf":  # DPF starts dense and prunes gradually: the dense init fits it
            with torch.no_grad():
                for layer in model.modules():
                    if isinstance(layer, (SparseLinear, SparseConv2d)) and layer.density > 0:
                        # Fan-in shrank to density x in_features: keep the dense init's activation
                        # scale, or a 90 %-sparse stack starts with vanishing outputs.
                        layer.values.mul_(layer.density ** -0.5)
        return model
    if method == "2:4":
        return _replace(model, nn.Linear, lambda m: SemiSparseLinear.from_dense(m)
                        if m.in_features % 4 == 0 and m.out_features % 4 == 0 else None)
    if method == "lowrank":
        return _replace(model, (nn.Linear, nn.Conv2d), lambda m: _low_rank(m, rank))
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def dst_driver(method, model, optimizer, *, density, delta, t_end, seed):
    """The dynamic-sparse-training driver of ``method`` (None for static, 2:4 and low-rank). The
    layers already hold ``sparsify``'s ERK structure at ``density``; the driver adopts it."""
    if method not in DRIVERS:
        return None
    return DRIVERS[method](model, optimizer, density=density, delta=delta, t_end=t_end, seed=seed)


def connects_input_to_output(model):
    """False when a Sequential of SparseLinear / nn.Linear / activations keeps no path from any
    input to any output (too few blocks for the width): such a network cannot learn at all."""
    if not isinstance(model, nn.Sequential):
        return True
    reach = None  # which inputs of the current layer carry signal; None = all of them
    for layer in model:
        if isinstance(layer, SparseLinear):
            (br, bc), mask = layer.block_size, layer.block_mask.cpu()
            cells = mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:layer.out_features, :layer.in_features]
            reach = (cells if reach is None else cells[:, reach]).any(1)
        elif isinstance(layer, nn.Linear):
            reach = torch.full((layer.out_features,), reach is None or bool(reach.any()))
    return reach is None or bool(reach.any())


def _shape(module):
    if isinstance(module, (nn.Conv2d, SparseConv2d, LowRankConv2d)):
        kh, kw = module.kernel_size
        return f"{module.in_channels}-{module.out_channels} {kh}x{kw}"
    return f"{getattr(module, 'in_features', '?')}-{getattr(module, 'out_features', '?')}"


def describe_layers(model):
    """[{"shape": "in-out" (convs: "in-out khxkw"), "kind": ..., "stored": fraction of the dense
    layer's weights}] in module order."""
    rows = []
    for module in model.modules():
        shape = _shape(module)
        if isinstance(module, (SparseLinear, SparseConv2d)):
            br, bc = (module.block_size,) * 2 if isinstance(module, SparseConv2d) else module.block_size
            rows.append({"shape": shape, "kind": f"block {br}" if br == bc else f"block {br}x{bc}",
                         "stored": round(module.density, 4)})
        elif isinstance(module, SemiSparseLinear):
            rows.append({"shape": shape, "kind": "2:4", "stored": 0.5})
        elif isinstance(module, (LowRankLinear, LowRankConv2d)):
            r, out, patch = module.S.shape[0], module.U.shape[0], module.V.shape[0]  # W = U S Vᵀ is out x patch
            rows.append({"shape": shape, "kind": f"rank {r}", "stored": round(r * (out + patch + r) / (out * patch), 4)})
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            rows.append({"shape": shape, "kind": "dense", "stored": 1.0})
    return rows


def _tensor_mb(tensors):
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def training_state_mb(model, optimizer, driver=None):
    """Weights, their gradients (one per weight: they exist from backward to zero_grad) and the
    optimizer state, plus a driver's shadow blocks with theirs (Top-KAST, DPF), in MiB."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    shadow = getattr(driver, "shadow", None) or {}
    shadow_params = [p for p, _ in shadow.values()]
    shadow_state = [t for s in getattr(driver, "shadow_optimizer", optimizer).state.values()
                    for t in s.values() if torch.is_tensor(t)] if shadow else []
    return 2 * _tensor_mb(params + shadow_params) + _tensor_mb(state + shadow_state)


def parameter_count(model, driver=None):
    """Weights the model trains: its parameters, plus a driver's shadow blocks (Top-KAST, DPF)."""
    count = sum(p.numel() for p in model.parameters())
    shadow = getattr(driver, "shadow", None)
    if shadow:
        count += sum(p.numel() for p, _ in shadow.values())
    return count
