"""``sparsekern info`` and the command's entry points (console script, ``python -m sparsekern``)."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sparsekern.cli import info, machine, main
from sparsekern.cli.machine import cpu_model, describe_l1d, environment, header

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sparsekern", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_python_m_sparsekern_info_names_the_cpu_and_every_product():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert cpu_model() in result.stdout
    for product in info.PRODUCTS:
        assert product in result.stdout
    assert "compiled extensions: _C_bsr" in result.stdout


@pytest.mark.parametrize("sysfs", [True, False], ids=["this-machine", "no-sysfs-geometry"])
def test_the_l1_data_cache_is_named_in_info_and_every_benchmark_header(capsys, monkeypatch, sysfs):
    assert describe_l1d({"ways": 8, "sets": 64, "line": 64}) == "L1d 32 KiB 8-way" and describe_l1d(None) == ""
    if not sysfs:
        for module in (machine, info):
            monkeypatch.setattr(module, "l1_data_cache", lambda: None)
    cache = machine.l1_data_cache()
    described = describe_l1d(cache)
    if cache is not None:
        size_kib = cache["ways"] * cache["sets"] * cache["line"] // 1024
        assert described == f"L1d {size_kib} KiB {cache['ways']}-way"
    env = environment()
    head = header(env, {"backend": "cpu", "isa": "avx2-fma"})
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    if described:
        assert env["l1d"] == described and described in head and described in out
    else:  # where sysfs does not say, nothing is claimed
        assert env["l1d"] is None and "L1d" not in head and "L1d" not in out


def test_console_script_points_at_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sparsekern"] == "sparsekern.cli:main"


def test_info_in_process(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "bsr_forward" in out
    assert "cpu float32" in out and "cpu bfloat16" in out and "cpu float16" in out
    if "_C_bsr built" in out:  # what computes bf16 at each block size on this path
        assert "bf16 block-sparse on this path: block 32 " in out and ", block 16 " in out


def test_unavailable_reason_distinguishes_missing_from_unable():
    import torch
    cpu = torch.device("cpu")
    assert info.unavailable_reason("bsr_forward", "reference", cpu, torch.float32) is None
    assert info.unavailable_reason("bsr_forward", "cuda", cpu, torch.float32) == ""  # not implemented
    reason = info.unavailable_reason("semi_forward", "cuda", cpu, torch.float32)
    assert reason and "CUDA" in reason


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["info", "--bogus"]])
def test_bad_command_line_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: sparsekern" in capsys.readouterr().err
