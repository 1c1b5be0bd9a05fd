"""Back to dense: the ``nn.Linear`` / ``nn.Conv2d`` a sparse layer stands for (``to_dense()`` of every layer)."""
import torch
from torch import nn

from .parameter import carry_requires_grad


def dense_linear(layer):
    """The ``nn.Linear`` a sparse layer stands for: its effective weight and bias, same device and dtype."""
    weight = layer.dense_weight().detach()
    return _filled(nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                             device=weight.device, dtype=weight.dtype), weight, layer)


def dense_conv2d(layer, groups=1):
    """The ``nn.Conv2d`` a conv layer stands for: its configuration, effective kernel and bias, same
    device and dtype."""
    weight = layer.dense_weight().detach()
    return _filled(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, groups, layer.bias is not None, device=weight.device,
                             dtype=weight.dtype), weight, layer)


def _filled(module, weight, layer):
    with torch.no_grad():
        module.weight.copy_(weight)
        if layer.bias is not None:
            module.bias.copy_(layer.bias)
    return carry_requires_grad(layer, module)
