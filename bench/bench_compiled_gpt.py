"""Compiled vs eager training of a nanoGPT-style model, dense and sparse (RigL), in one process.

    python bench/bench_compiled_gpt.py                       # 4 layers, d_model 512, RigL at density 0.1
    python bench/bench_compiled_gpt.py --rounds 8 --json bench/results/compiled_gpt.jsonl
    python bench/bench_compiled_gpt.py --threads 1 --timer thread   # steady on a machine shared with other jobs
    python bench/bench_compiled_gpt.py --layers 2 --d-model 128 --context 32 --rounds 1   # smoke run

Four trainings from the same initialisation and batches: dense and sparse, each eager and under
``torch.compile`` (inductor). The sparse model is the dense one through ``sparsify`` (its
attention and MLP linears become SparseLinear, block 32, ERK at ``--density``; the head,
tied to the token embedding, stays dense) trained by RigL with a mask update every
``--delta`` steps. A timed unit is a chunk of ``--delta`` steps (so each holds one update
step and its probe step); the four chunks run in turn, round after round, and every ratio is
the median of the per-round ratios. The first chunk of each training (compilation included)
is reported apart. Eager and compiled sparse training see the same batches: their losses and
final masks are compared.

Data: character-level windows of the Debian ``fortunes`` text (``apt-get install -y fortunes``).
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import datasets
import sparsekern as sk
from gpt import ATTENTION, GPT
from timing import CLOCKS, TIMER_HELP, Timer, alternate, append_rows, environment, header, kernel_path, median_ratio

VARIANTS = ("dense eager", "dense compiled", "sparse eager", "sparse compiled")


def batches(args):
    """An endless stream of (ids, targets) batches of ``--batch`` windows, from a seeded generator."""
    train_x, train_y, _, _, vocab = datasets.text_windows(datasets.load_fortunes(), args.context)
    generator = torch.Generator().manual_seed(args.seed)

    def draw():
        rows = torch.randint(0, len(train_x), (args.batch,), generator=generator)
        x = train_x[rows]
        return x, torch.cat([x[:, 1:], train_y[rows, None]], 1)
    return draw, vocab


class Training:
    """One training: its model, optimizer, driver (names "sparse ..."), batches and losses; names
    "... compiled" run under torch.compile, and ``autocast`` (a dtype) runs forward and loss
    under torch.autocast("cpu", dtype=autocast)."""

    def __init__(self, name, args, autocast=None):
        self.name, self.autocast = name, autocast
        self.draw, vocab = batches(args)
        self.model = GPT(vocab, args.context, args.layers, args.d_model, args.heads, seed=args.seed,
                         attention=args.attention)
        self.driver = None
        if name.startswith("sparse"):
            sk.sparsify(self.model, density=args.density, block_size=args.block_size, dense_layers=["head"])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.1)
        if name.startswith("sparse"):
            self.driver = sk.methods.RigL(self.model, self.optimizer, density=args.density, delta=args.delta,
                                          t_end=10 ** 9, seed=args.seed)
        self.forward = torch.compile(self.model) if name.endswith("compiled") else self.model
        self.losses, self.graphs, self.delta, self.clip = [], 0, args.delta, args.clip

    def chunk(self):
        """``delta`` training steps; counts the graphs dynamo compiles meanwhile."""
        before = _graphs()
        for _ in range(self.delta):
            x, y = self.draw()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
                logits = self.forward(x)
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            if self.driver is not None:
                self.driver.step()
            self.losses.append(loss.item())
        self.graphs += _graphs() - before


def _graphs():
    """Graphs dynamo has compiled in this process so far."""
    if "torch._dynamo" not in sys.modules:
        return 0
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def training_arguments(description, batch):
    """The parser of a GPT training benchmark: model, sparsity, RigL and timing options."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="torch's fused SDPA, or attention as matmuls (faster in bf16 on CPU; see gpt.py)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--delta", type=int, default=10, help="steps between RigL updates = steps per timed chunk")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0,
                   help="clip the gradient norm to this (0: off). Without it this model's loss spikes to 4-9 "
                        "nats at a few steps of some seeds, in fp32 and bf16 alike")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of one chunk per training")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--timer", choices=sorted(CLOCKS), default="wall", help=TIMER_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="append the rows to this JSON-lines file")
    return p


def main(argv=None):
    args = training_arguments(__doc__, batch=8).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env, path = environment(), kernel_path("bsr_forward", torch.device("cpu"), torch.float32)
    print(f"# {header(env, path)}, fp32, GPT {args.layers} layers d_model {args.d_model} context {args.context} "
          f"batch {args.batch}; sparse: RigL density {args.density} block {args.block_size}, update every "
          f"{args.delta} steps; median of {args.rounds} alternating rounds of {args.delta}-step chunks, "
          f"{args.timer} time")

    trainings = {name: Training(name, args) for name in VARIANTS}
    first = {}
    for name, training in trainings.items():  # compilation happens here, not in the timed rounds
        start = time.perf_counter()
        training.chunk()
        first[name] = (time.perf_counter() - start) * 1e3 / args.delta
    samples, _ = alternate({name: t.chunk for name, t in trainings.items()}, args.rounds, Timer(args.timer))
    per_step = {name: [ms / args.delta for ms in times] for name, times in samples.items()}

    eager, compiled = trainings["sparse eager"], trainings["sparse compiled"]
    masks = [(a.block_mask, b.block_mask) for (_, a), (_, b) in zip(eager.driver.layers, compiled.driver.layers)]
    agree = sum(int((a == b).sum()) for a, b in masks) / sum(a.numel() for a, _ in masks)
    loss_gap = max(abs(a - b) / abs(a) for a, b in zip(eager.losses, compiled.losses))
    rows = []
    print(f"{'training':<16} {'ms/step':>9} {'compiled/eager':>15} {'dense/sparse':>13} {'first chunk ms/step':>20} "
          f"{'graphs':>7} {'last loss':>10}")
    for name in VARIANTS:
        kind, mode = name.split()
        vs_eager = median_ratio(per_step[f"{kind} eager"], per_step[name])
        vs_dense = median_ratio(per_step[f"dense {mode}"], per_step[name])
        t = trainings[name]
        row = dict(env, kernel=path, case=name, ms_per_step=statistics.median(per_step[name]),
                   speedup_vs_eager=vs_eager, speedup_vs_dense=vs_dense, first_chunk_ms_per_step=first[name],
                   graphs=t.graphs, last_loss=t.losses[-1], steps=len(t.losses), layers=args.layers,
                   d_model=args.d_model, context=args.context, batch=args.batch, density=args.density,
                   block_size=args.block_size, delta=args.delta, rounds=args.rounds, timer=args.timer)
        rows.append(row)
        print(f"{name:<16} {row['ms_per_step']:>9.1f} {vs_eager:>14.2f}x {vs_dense:>12.2f}x {first[name]:>20.0f} "
              f"{t.graphs:>7} {t.losses[-1]:>10.4f}")
    print(f"# sparse eager vs compiled, same batches: {agree:.4f} of the blocks agree in the final masks "
          f"({len(eager.driver.update_seconds)} updates), largest relative loss difference "
          f"{loss_gap:.2e} over {len(eager.losses)} steps")
    for row in rows:
        row.update(sparse_mask_agreement=agree, sparse_max_relative_loss_gap=loss_gap)
    append_rows(rows, args.json)


if __name__ == "__main__":
    main()
