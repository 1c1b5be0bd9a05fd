"""The ``sparsekern`` command (also ``python -m sparsekern``): ``info``, ``train``, ``bench``."""
import argparse
import os
import sys

from .errors import CliError

# Commands that time dense against sparse put torch's large allocations on huge pages, as
# the package's own kernel outputs are, so the ratios compare kernels and not page faults
# (torch reads this at its first allocation; THP_MEM_ALLOC_ENABLE=0 measures without).
_MEASURING = ("train", "bench")
DESCRIPTION = "Block-sparse, 2:4 and low-rank training kernels: what runs here, and how fast against dense."
EXAMPLES = """examples:
  sparsekern info                              versions, CPU flags, built extensions, kernel backends
  sparsekern train                             MLP on digits, dense vs RigL (density 0.1, block 32)
  sparsekern train --method 2:4 --steps 300    the same against 2:4 semi-structured layers
  sparsekern bench --blocks 32 --densities 0.5 0.1    one block-sparse layer vs nn.Linear
  sparsekern COMMAND --help                    every option, with its default"""


def build_parser():
    # The commands are imported here, not above: bench/ imports the measurement modules of this
    # package and needs none of them.
    from .. import __version__
    from . import bench, info, train
    parser = argparse.ArgumentParser(prog="sparsekern", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sparsekern {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info.add_parser(commands)
    train.add_parser(commands)
    bench.add_parser(commands)
    return parser


def main(argv=None):
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit status
    (argparse exits with 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    if args.command in _MEASURING:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        return args.run(args)
    except CliError as exc:
        print(f"sparsekern {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nsparsekern {args.command}: interrupted", file=sys.stderr)
        return 130
