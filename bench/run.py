"""Run a registered benchmark or experiment by name, with its own options.

    python bench/run.py                                   # list the names
    python bench/run.py bsr_linear                        # = python bench/bench_bsr_linear.py
    python bench/run.py bsr_linear --tokens 64 --in-features 128 --out-features 128 --blocks 32 --json ''
    python bench/run.py semi_linear --help                # the benchmark's options

Each name is a script of this folder, which also runs on its own as ``python bench/<script>.py``.
"""
import ast
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# name -> module (bench/<module>.py, with a main(argv)); one token per kernel family.
REGISTRY = {
    "bsr_linear": "bench_bsr_linear",
    "bsr_triton": "bench_bsr_triton",
    "bsr_warmup": "bench_bsr_warmup",
    "per_sample_grads": "bench_per_sample_grads",
    "conv2d": "bench_conv2d",
    "semi_linear": "bench_semi_linear",
    "semi_dst_update": "bench_semi_dst_update",
    "lowrank_linear": "bench_lowrank_linear",
    "gpt_bf16": "bench_gpt_bf16",
    "compiled_gpt": "bench_compiled_gpt",
    "distributed": "bench_distributed",
    "exp_cnn": "exp_cnn",
    "exp_dst": "exp_dst",
    "exp_dlrt": "exp_dlrt",
    "exp_prune_at_init": "exp_prune_at_init",
}


def summary(module):
    """The first line of the module's docstring, read without importing it (torch, sparsekern)."""
    with open(os.path.join(HERE, module + ".py"), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.split("\n")[0]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__.split("\n\n")[1] + "\n\nregistered:")
        for name, module in REGISTRY.items():
            print(f"  {name:<18} {module}.py: {summary(module)}")
        return
    name, options = argv[0], argv[1:]
    if name not in REGISTRY:
        raise SystemExit(f"unknown benchmark {name!r}; registered: {', '.join(REGISTRY)}")
    module = importlib.import_module(REGISTRY[name])  # before torch: scripts set allocator variables first
    sys.argv[0] = module.__file__  # argparse names the script in its usage lines
    module.main(options)


if __name__ == "__main__":
    main()
