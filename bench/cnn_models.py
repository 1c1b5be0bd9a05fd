"""The convolutional networks of bench/exp_cnn.py: a small ResNet (block-sparse methods) and
LeNet-5 (low-rank, DLRT). Both take flat (N, side * side) one-channel images, as bench/datasets.py
gives them, and are built dense; the experiment converts their layers.
"""
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.cli.models import ChannelsLast

# ResNet layers kept dense by name: the one-channel stem (a 1-input-channel conv is a single
# partial block at any block size) and the classifier (10 outputs: one padded block row).
RESNET_DENSE = ("stem", "fc")


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm; a 1x1 conv + batch norm shortcut where the shape changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-20 style: a 3x3 stem conv from one channel to ``widths[0]``, then one stage of
    ``blocks`` basic blocks per width (stride 2 at each stage after the first), global average
    pool, a linear classifier. Activations are channels-last (the convs' fast memory format,
    dense and sparse)."""

    def __init__(self, widths=(32, 64, 128), blocks=3, classes=10, side=28, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.side = side
        self.to_image = nn.Unflatten(1, (1, side, side))
        self.channels_last = ChannelsLast()  # after the one-channel stem (see ChannelsLast)
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stages.append(BasicBlock(c_in, width, 2 if i > 0 and j == 0 else 1))
                c_in = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.channels_last(self.stem(self.to_image(x)))))
        return self.fc(F.adaptive_avg_pool2d(self.stages(x), 1).flatten(1))


def conv_macs(model, side=28):
    """Multiply-adds of one forward pass of one image through the model's convs and linears
    (dense layers counted in full, block-sparse ones at their stored blocks)."""
    total, hooks = [0], []

    def count(module, _, out):
        if isinstance(module, nn.Conv2d):
            total[0] += out[0].numel() * module.weight[0].numel()
        elif isinstance(module, sk.SparseConv2d):  # values: (nnz, bs, bs, kh, kw), groups 1
            total[0] += out[0, 0].numel() * module.values.numel()
        elif isinstance(module, nn.Linear):
            total[0] += module.weight.numel()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, sk.SparseConv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(count))
    training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, side * side))
    model.train(training)
    for h in hooks:
        h.remove()
    return total[0]


class LeNet5(nn.Module):
    """LeNet-5: two 5x5 convs (no padding), each followed by ReLU and 2x2 max-pool, then fully
    connected layers. ``widths`` = (conv1, conv2, hidden...): (20, 50, 500) is Caffe's LeNet,
    (6, 16, 120, 84) the original. With ``rank``, every conv and hidden linear layer is the
    truncated SVD of the same dense initialisation at rank min(``rank``, the layer's full rank):
    ``LowRankConv2d`` / ``LowRankLinear``; the classifier stays dense."""

    def __init__(self, widths=(20, 50, 500), classes=10, side=28, rank=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        c1, c2, *hidden = widths
        pooled = ((side - 4) // 2 - 4) // 2
        flat = c2 * pooled * pooled
        layers = [nn.Unflatten(1, (1, side, side)), nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
        width = flat
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        if rank is not None:
            layers = [_low_rank(m, rank) if isinstance(m, (nn.Conv2d, nn.Linear)) and i < len(layers) - 1 else m
                      for i, m in enumerate(layers)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _low_rank(module, rank):
    if isinstance(module, nn.Conv2d):
        full = min(module.out_channels, module.weight[0].numel())
        return sk.LowRankConv2d.from_dense(module, rank=min(rank, full))
    return sk.LowRankLinear.from_dense(module, rank=min(rank, module.in_features, module.out_features))


def ranks(model):
    """The rank of every low-rank layer, in module order."""
    return [m.rank for m in model.modules() if isinstance(m, (sk.LowRankConv2d, sk.LowRankLinear))]
