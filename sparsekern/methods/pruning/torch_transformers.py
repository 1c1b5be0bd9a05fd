"""torch.nn's Transformer modules, which read some of their layers' dense weights themselves.

- ``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward``
  instead of calling ``out_proj``: a converted out_proj would break it, so those layers stay
  dense (its q/k/v projections are one raw parameter, never converted either).
- ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` run a fused inference kernel
  (eval mode without autograd) on ``linear1.weight`` and ``linear2.weight``. Where a layer's
  feed-forward linears are sparse, that path is switched off through the attribute each checks
  first (``activation_relu_or_gelu``, ``use_nested_tensor``), and switched back on (the value
  kept aside) once both are dense again (``densify``); the layers' own forward is unchanged.
"""
from torch import nn

_KEPT = "_sparsekern_fused_path"  # the attribute's value before the fused path was switched off


def attention_owned_linears(model):
    """Names of the nn.Linear layers that an nn.MultiheadAttention reads the weight of directly."""
    owned = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [name for name, m in model.named_modules() if id(m) in owned and isinstance(m, nn.Linear)]


def sync_fused_paths(model):
    """Switch torch's fused encoder paths off where a feed-forward linear is not an nn.Linear, back on
    where they all are again."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            _switch(module, "activation_relu_or_gelu", 0, _dense_feed_forward(module))
        elif isinstance(module, nn.TransformerEncoder):
            _switch(module, "use_nested_tensor", False, all(_dense_feed_forward(layer) for layer in module.layers))


def _dense_feed_forward(layer):
    return isinstance(layer.linear1, nn.Linear) and isinstance(layer.linear2, nn.Linear)


def _switch(module, attribute, off, fused_allowed):
    if not fused_allowed and _KEPT not in vars(module):
        setattr(module, _KEPT, getattr(module, attribute))
        setattr(module, attribute, off)
    elif fused_allowed and _KEPT in vars(module):
        setattr(module, attribute, vars(module).pop(_KEPT))
