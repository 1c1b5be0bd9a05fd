"""Where the commands write their files, and how."""
import datetime
import json
import os


def timestamp():
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def out_dir(path, command):
    """``path``, or ./sparsekern-<command>-<timestamp>/ in the current directory; created."""
    path = path or os.path.join(os.getcwd(), f"sparsekern-{command}-{timestamp()}")
    os.makedirs(path, exist_ok=True)
    return path


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def write_json_lines(rows, path):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def matplotlib_or_none():
    """pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt
    return plt


PLOT_HINT = 'no plot: matplotlib is not installed (pip install "sparsekern[plot]")'
