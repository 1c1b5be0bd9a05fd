"""The benchmark scripts: bench/run.py names every one, each name runs a main(argv), the layer
benchmarks' --device refuses a GPU that is not there, the per-sample gradient and warm-up benchmarks run,
and the DST speed comparison runs compiled."""
import ast
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def _registry():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports neither torch nor the scripts
    return module.REGISTRY


def _has_main_with_argv(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(node, ast.FunctionDef) and node.name == "main" and node.args.args
               and node.args.args[0].arg == "argv" for node in tree.body)


def test_every_registered_name_is_a_script_with_main_argv():
    for name, module in _registry().items():
        path = BENCH / f"{module}.py"
        assert path.exists(), f"{name}: {path} is missing"
        assert _has_main_with_argv(path), f"{name}: {path.name} has no main(argv)"


def test_every_benchmark_and_experiment_script_is_registered():
    registered = set(_registry().values())
    scripts = {p.stem for p in BENCH.glob("*.py") if p.stem.startswith(("bench_", "exp_"))}
    assert scripts <= registered, f"not in bench/run.py: {sorted(scripts - registered)}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the scripts would run on it")
@pytest.mark.parametrize("script", ["bench_bsr_linear.py", "bench_conv2d.py"])
def test_device_cuda_without_a_gpu_is_a_clear_error(script):
    result = subprocess.run([sys.executable, str(BENCH / script), "--device", "cuda"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "--device cuda: torch sees no CUDA GPU here" in result.stderr


def test_per_sample_gradient_benchmark_runs_and_names_the_cpu(tmp_path):
    rows = tmp_path / "rows.jsonl"
    result = subprocess.run([sys.executable, str(BENCH / "bench_per_sample_grads.py"), "--features", "64",
                             "--densities", "0.5", "--block-size", "16", "--ranks", "8", "--conv-shapes", "16x4",
                             "--conv-block-size", "8", "--batch", "3", "--repeats", "1", "--warmup", "2",
                             "--threads", "1", "--json", str(rows)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [row["kind"] for row in rows] == ["bsr", "semi", "lowrank", "conv"]
    assert all(row["bench"] == "per_sample_grads" and row["cpu"] and row["backend"] and row["ratio"] > 0
               for row in rows)


def test_warmup_benchmark_times_every_call_after_each_predecessor(tmp_path):
    rows = tmp_path / "rows.jsonl"
    result = subprocess.run([sys.executable, str(BENCH / "bench_bsr_warmup.py"), "--dtype", "fp32", "--tokens", "32",
                             "--features", "64", "--block", "16", "--densities", "0.5", "--calls", "3", "--rounds", "1",
                             "--pause-ms", "1", "--threads", "1", "--json", str(rows)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [row["before"] for row in rows] == ["back to back", "after dense", "after 1 ms idle"]
    assert all(row["bench"] == "bsr_warmup" and row["cpu"] and row["isa"] and len(row["call_ms"]) == 3
               and row["dense_ms"] > 0 for row in rows)


@pytest.mark.filterwarnings("ignore:.*store no block")
def test_dst_speed_comparison_compiles_both_models_before_timing(monkeypatch):
    """--speed-compile (exp_dst.py, exp_cnn.py): both trainings run under torch.compile, and the
    two warm-up chunks (compilation, then the recompilation after RigL changes the block counts)
    are reported apart from the timed rounds."""
    import types

    import sparsekern as sk
    monkeypatch.syspath_prepend(str(BENCH))
    from dst_training import speed

    def make(sparse, density):
        torch.manual_seed(0)
        first = sk.SparseLinear(64, 64, block_size=16, density=density) if sparse else torch.nn.Linear(64, 64)
        return torch.nn.Sequential(first, torch.nn.ReLU(), torch.nn.Linear(64, 10))

    args = types.SimpleNamespace(speed_block_sizes=[16], densities=[0.5], speed_method="rigl", lr=0.01,
                                 score_method="auto", speed_delta=2, alpha=0.3, speed_rounds=1, batch=8,
                                 speed_precision="fp32", speed_compile=True)
    g = torch.Generator().manual_seed(0)
    train_x, train_y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    [row] = speed(args, {}, train_x, train_y, make, {"model": "tiny"})
    assert row["compiled"] is True and set(row["compile_warmup_s"]) == {"dense", "rigl"}
    assert row["median_speedup"] > 0 and row["updates"] >= 2
