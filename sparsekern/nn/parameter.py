"""The layers' parameters: their shape changed in place, for structures that grow and shrink, the
devices a stored structure can live on, and which of them train after a conversion."""
import torch


def refuse_meta_device(what, device):
    """A clear error where ``what`` (a layer with a stored structure) would be built on the meta
    device, given as ``device`` or by a ``torch.device("meta")`` context: which blocks or positions
    it stores is data, which meta tensors do not hold and ``to_empty`` would not restore."""
    if torch.empty(0, device=device).device.type == "meta":
        raise ValueError(f"{what} cannot be built on the meta device: which weights it stores is data, which "
                         "meta tensors do not hold (and to_empty would not restore); build it on the CPU or "
                         "its device (the structure is small), or sparsify a meta-initialised dense model "
                         "after to_empty")


def replace_data_(param, data):
    """Give ``param`` the tensor ``data`` (any shape), keeping the Parameter object.

    Optimizers keep holding the same object; ``.grad`` is cleared because its shape
    is stale. Autograd caches one AccumulateGrad node per leaf with the leaf's old
    shape, and keeps it while any old graph is alive (e.g. the previous ``loss``):
    the next backward would then fail with "invalid gradient ... expected shape
    <old>". torch drops that cache only when ``.data`` changes dtype, hence the
    brief detour through another dtype.
    """
    other = torch.float32 if data.dtype == torch.float64 else torch.float64
    param.data = data.new_empty(0, dtype=other)
    param.data = data
    param.grad = None
    # A graph recorded before the swap must not put its gradient on the new structure:
    # a new version makes its backward refuse (ops.checks.saved_tensors says why).
    torch.autograd.graph.increment_version(param)


def carry_requires_grad(source, converted):
    """``converted`` (a layer made from the dense ``source``, or the dense layer made from a sparse
    ``source``) trains what ``source`` trained: its bias follows the source's bias, every other
    parameter the source's weight (any weight-side parameter of the source, for a sparse one), so
    a frozen layer stays frozen through sparsify, freeze, densify and from_dense."""
    weight_trained = any(p.requires_grad for name, p in source.named_parameters() if name.rpartition(".")[2] != "bias")
    bias = getattr(source, "bias", None)
    for name, p in converted.named_parameters():
        p.requires_grad_(bool(bias.requires_grad) if name == "bias" and bias is not None else weight_trained)
    return converted
