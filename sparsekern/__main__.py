"""``python -m sparsekern``: the command-line interface (see sparsekern.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
