"""``sparsekern bench`` (tiny) and bench/bench_bsr_linear.py, which runs the same cases."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsekern.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tokens", "32", "--blocks", "32", "--densities", "1", "0.5", "--reps", "1", "--no-torch-bsr"]


@pytest.fixture(autouse=True)
def _no_environment_change(monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", os.environ.get("THP_MEM_ALLOC_ENABLE", "0"))


def test_bench_prints_the_ratio_table_and_writes_rows(tmp_path, capsys):
    assert main(["bench", *TINY, "--features", "64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "block density |    fwd     dx     dw   step" in out
    rows = [json.loads(line) for line in (tmp_path / "bsr_linear.jsonl").read_text().splitlines()]
    assert [(r["block"], r["density"]) for r in rows] == [(32, 1.0), (32, 0.5)]
    assert all(r["step_ratio"] > 0 and r["fwd_rel_err"] < 1e-5 for r in rows)
    if (tmp_path / "bsr_linear.png").exists():
        assert (tmp_path / "bsr_linear.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert 'pip install "sparsekern[plot]"' in out


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_bench_runs_half_types_without_torchs_bsr_peer(tmp_path, capsys, dtype):
    # torch's CPU BSR matmul has no half-type kernel: the peer column stays empty instead of failing
    args = ["--tokens", "32", "--blocks", "32", "--densities", "0.5", "--reps", "1", "--dtype", dtype]
    assert main(["bench", *args, "--features", "64", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bsr_linear.jsonl").read_text().splitlines()]
    assert [r["dtype"] for r in rows] == [{"bf16": "bfloat16", "fp16": "float16"}[dtype]]
    assert rows[0]["step_ratio"] > 0 and "torch_bsr_fwd_ms" not in rows[0]


@pytest.mark.parametrize("product, extra, cases", [
    ("semi", [], ["fwd", "fwd+bwd static", "fwd+bwd static rowwise", "fwd+bwd dynamic", "fwd+bwd dynamic rowwise",
                  "prune"]),
    ("lowrank", ["--ranks", "8"], ["fwd+bwd", "fwd+bwd unfused", "step"]),
])
def test_semi_and_lowrank_print_their_cases_and_write_rows(tmp_path, capsys, product, extra, cases):
    assert main(["bench", "--product", product, "--tokens", "32", "--features", "64", "--reps", "1",
                 "--out", str(tmp_path), *extra]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / f"{product}_linear.jsonl").read_text().splitlines()]
    assert [r["case"] for r in rows] == cases
    assert all(r["ratio"] > 0 and r["cpu"] and r["backend"] for r in rows)
    assert all(case in out for case in cases)


def test_conv_prints_each_product_with_the_floor_rule_path_and_writes_rows(tmp_path, capsys):
    assert main(["bench", "--product", "conv", "--conv-shapes", "16x6", "--batch", "2", "--blocks", "8",
                 "--densities", "1", "0.25", "--reps", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "C  HW density stored     op" in out
    rows = [json.loads(line) for line in (tmp_path / "conv2d.jsonl").read_text().splitlines()]
    assert [(r["density"], r["op"]) for r in rows] == [(d, op) for d in (1.0, 0.25) for op in ("fwd", "dx", "dw", "step")]
    assert all(r["ratio"] > 0 and r["path"] and r["isa"] for r in rows)
    # a 2 x 2 grid at density 0.25 stores one block
    assert all(r["stored_density"] == r["density"] and r["limit"] == pytest.approx(r["ratio"] * r["density"])
               for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--product", "semi", "--features", "66"], "multiple of 4"),
    (["--product", "lowrank", "--features", "64", "--ranks", "128"], "exceed --features 64"),
    (["--product", "conv", "--conv-shapes", "16by6"], "--conv-shapes: shapes must be CxH pairs"),
])
def test_impossible_shapes_are_refused(capsys, argv, message):
    assert main(["bench", *argv]) == 1
    assert message in capsys.readouterr().err


def test_features_must_be_whole_blocks(capsys):
    assert main(["bench", "--features", "100", "--blocks", "32"]) == 1
    assert "multiple of every block size" in capsys.readouterr().err


def test_bad_density_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--densities", "1.5"])
    assert exc.value.code == 2
    assert "argument --densities" in capsys.readouterr().err


def test_the_benchmark_script_still_runs_its_table():
    result = subprocess.run([sys.executable, "bench/bench_bsr_linear.py", "--threads", "1", "--json", "",
                             "--in-features", "64", "--out-features", "64", *TINY],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[4].startswith("block density |")
    assert len(lines) == 7 and lines[5].split()[:2] == ["32", "1.000"]
    assert lines[5].split("|")[-1].strip() == "-/-/-"  # tests run the kernels unmeasured (SPARSEKERN_FLOOR=off)


@pytest.mark.parametrize("script, argv", [
    ("bench/bench_semi_linear.py", ["--shapes", "32,64,64"]),
    ("bench/bench_lowrank_linear.py", ["--tokens", "32", "--in-features", "64", "--out-features", "64",
                                       "--ranks", "8"]),
])
def test_the_semi_and_lowrank_scripts_run_the_package_cases(script, argv):
    result = subprocess.run([sys.executable, script, "--threads", "1", "--repeats", "1", *argv],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows and all(r["ratio"] > 0 for r in rows)


def test_conv_cases_run_strided():
    from sparsekern.cli import conv_bench
    from sparsekern.cli.timing import Timer
    rows = list(conv_bench.run_cases([(16, 7)], [0.25], 2, 8, 1, Timer("wall"), {}, stride=2))
    assert [r["op"] for r in rows] == ["fwd", "dx", "dw", "step"]
    assert all(r["stride"] == 2 and r["ratio"] > 0 and r["case"].startswith("16x7-s2-") for r in rows)


def test_conv_cases_run_in_bf16():
    from sparsekern.cli import conv_bench
    from sparsekern.cli.timing import Timer
    rows = list(conv_bench.run_cases([(16, 6)], [0.5], 2, 8, 1, Timer("wall"), {}, dtype=torch.bfloat16))
    assert [r["op"] for r in rows] == ["fwd", "dx", "dw", "step"]
    assert all(r["dtype"] == "bfloat16" and r["ratio"] > 0 for r in rows)
