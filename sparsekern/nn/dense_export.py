"""Back to dense: the ``nn.Linear`` a sparse layer stands for (``to_dense()`` of every layer)."""
import torch
from torch import nn


def dense_linear(layer):
    """The ``nn.Linear`` a sparse layer stands for: its effective weight and bias, same device and dtype."""
    weight = layer.dense_weight().detach()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear
