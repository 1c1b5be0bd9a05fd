"""The networks of the DST experiments (bench/exp_dst.py): dense or sparsekern hidden layers.

``args`` carries the sizes and the sparse layer kind: ``--hidden-layer`` "block"
(SparseLinear of ``--block-size``), "semi" or "semi-transposable" (2:4 SemiSparseLinear).
"""
import torch
from torch import nn

import sparsekern as sk


def hidden(sparse, n_in, n_out, args):
    """A hidden layer: nn.Linear (dense runs), SparseLinear, or 2:4 SemiSparseLinear."""
    if not sparse:
        return nn.Linear(n_in, n_out)
    if args.hidden_layer == "block":
        return sk.SparseLinear(n_in, n_out, block_size=args.block_size)
    return sk.SemiSparseLinear(n_in, n_out, transposable=args.hidden_layer == "semi-transposable")


def fashion_model(sparse, args, seed=0):
    """Fashion-MNIST MLP 784-H-H-10 (H = ``args.hidden``); the output layer stays dense."""
    torch.manual_seed(seed)
    h = args.hidden
    return nn.Sequential(hidden(sparse, 784, h, args), nn.ReLU(),
                         hidden(sparse, h, h, args), nn.ReLU(), nn.Linear(h, 10))


class CharMLP(nn.Module):
    """Character-level language model: ``args.context`` characters, embedded, two hidden layers."""

    def __init__(self, sparse, vocab, args, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, args.embed)
        self.body = nn.Sequential(hidden(sparse, args.context * args.embed, args.text_hidden, args),
                                  nn.ReLU(), hidden(sparse, args.text_hidden, args.text_hidden, args),
                                  nn.ReLU(), nn.Linear(args.text_hidden, vocab))

    def forward(self, x):
        return self.body(self.embed(x).flatten(1))
