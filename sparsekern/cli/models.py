"""The networks ``sparsekern train`` compares: a dense MLP and its sparse (or low-rank) twin.

Both start from the same dense initialisation (same seed). Block methods convert every
nn.Linear with ``sparsify`` (random blocks at ERK densities; kept values scaled by
density**-0.5, except for DPF, which starts dense) and, except "static", hand the model to the
dynamic-sparse-training driver of the method; "2:4" and "lowrank" convert each
layer where the format applies (2:4: feature counts that are multiples of 4; low-rank: where
rank r stores fewer weights than the dense layer) and leave the others dense.
"""
import torch
from torch import nn

from .. import methods
from ..methods import sparsify
from ..nn import LowRankLinear, SemiSparseLinear, SparseLinear

DRIVERS = {"rigl": methods.RigL, "set": methods.SET, "snfs": methods.SNFS, "ggr": methods.GGR,
           "topkast": methods.TopKAST, "dpf": methods.DPF}
BLOCK_METHODS = ("static", *DRIVERS)
METHODS = (*BLOCK_METHODS, "2:4", "lowrank")
MODELS = ("mlp",)


def family(method):
    """The kernel family a method's layers run on."""
    return {"2:4": "semi", "lowrank": "lowrank"}.get(method, "bsr")


def mlp(features, hidden, classes, seed):
    """features -> hidden -> hidden -> classes, ReLU between (the hidden x hidden layer dominates)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def _replace_linears(model, convert):
    for name, module in list(model.named_children()):
        if isinstance(module, nn.Linear):
            new = convert(module)
            if new is not None:
                setattr(model, name, new)
        else:
            _replace_linears(module, convert)
    return model


def sparse_model(model, method, *, density, block_size, rank):
    """Convert the dense ``model`` in place for ``method`` and return it."""
    if method in BLOCK_METHODS:
        model = sparsify(model, density=density, method="erk", block_size=block_size)
        if method != "dpf":  # DPF starts dense and prunes gradually: the dense init fits it
            with torch.no_grad():
                for layer in model.modules():
                    if isinstance(layer, SparseLinear) and layer.density > 0:
                        # Fan-in shrank to density x in_features: keep the dense init's activation
                        # scale, or a 90 %-sparse stack starts with vanishing outputs.
                        layer.values.mul_(layer.density ** -0.5)
        return model
    if method == "2:4":
        return _replace_linears(model, lambda m: SemiSparseLinear.from_dense(m)
                                if m.in_features % 4 == 0 and m.out_features % 4 == 0 else None)
    if method == "lowrank":
        return _replace_linears(model, lambda m: LowRankLinear.from_dense(m, rank=rank)
                                if rank * (m.in_features + m.out_features) < m.in_features * m.out_features else None)
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


def describe_layers(model):
    """[{"shape": "in-out", "kind": ..., "stored": fraction of the dense layer's weights}] in module order."""
    rows = []
    for module in model.modules():
        shape = f"{getattr(module, 'in_features', '?')}-{getattr(module, 'out_features', '?')}"
        if isinstance(module, SparseLinear):
            br, bc = module.block_size
            rows.append({"shape": shape, "kind": f"block {br}" if br == bc else f"block {br}x{bc}",
                         "stored": round(module.density, 4)})
        elif isinstance(module, SemiSparseLinear):
            rows.append({"shape": shape, "kind": "2:4", "stored": 0.5})
        elif isinstance(module, LowRankLinear):
            r = module.S.shape[0]
            rows.append({"shape": shape, "kind": f"rank {r}",
                         "stored": round(r * (module.in_features + module.out_features + r)
                                         / (module.in_features * module.out_features), 4)})
        elif isinstance(module, nn.Linear):
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
