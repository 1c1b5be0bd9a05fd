"""A nanoGPT-style character language model (pre-norm transformer, causal attention, GELU MLP,
language-model head tied to the token embedding), for the compiled-training benchmark.

Its nn.Linear layers (attention q/k/v and output projections, MLP) are what ``sparsify``
converts; the tied head stays dense.

``attention``: "sdpa" (torch's ``scaled_dot_product_attention``) or "matmul" (the same
causal attention as two matmuls and a softmax). On CPU in bf16, torch 2.13's fused
SDPA backward is the slow part: at batch 16 x 8 heads x 128 tokens x 64, SDPA fwd+bwd
takes 25.9 ms per layer against 10.1 ms as matmuls (fp32: 14.4 vs 14.5 ms).
"""
import torch
import torch.nn.functional as F
from torch import nn


ATTENTION = ("sdpa", "matmul")


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, heads, attention="sdpa"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.heads, self.attention = heads, attention
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # under autocast the matmuls run in bf16 and the softmax in fp32, as SDPA's math path does
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            future = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).triu(1)
            y = torch.softmax(scores.masked_fill(future, float("-inf")), -1) @ v
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    def __init__(self, d_model, heads, attention="sdpa"):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, heads, attention)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """``layers`` blocks of width ``d_model`` over ``context`` tokens of a ``vocab``-symbol alphabet."""

    def __init__(self, vocab, context, layers=4, d_model=512, heads=8, seed=0, attention="sdpa"):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        torch.manual_seed(seed)
        self.context = context
        self.token = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, attention) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.token.weight
        for name, p in self.named_parameters():  # nanoGPT's initialisation
            if p.dim() == 2:
                std = 0.02 / (2 * layers) ** 0.5 if name.endswith("proj.weight") or name.endswith("mlp.2.weight") \
                    else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids):
        x = self.token(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
