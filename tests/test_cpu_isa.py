"""SPARSEKERN_CPU_ISA: a lower microkernel path for every compiled family, read when the
extensions load (so each case runs in a fresh process); a path the CPU lacks is an error."""
import os
import subprocess
import sys

import pytest
import torch

from sparsekern.cli.machine import cpu_flags
from sparsekern.kernels import microkernel
from sparsekern.kernels.bsr import cpu

pytestmark = pytest.mark.skipif(cpu.unavailable(torch.device("cpu"), torch.float32) is not None,
                                reason="the cpu backend is not built")

_PROBE = """
import torch, sparsekern as sk
from sparsekern.kernels import microkernel, available_backends
layer = sk.SparseLinear(64, 64, block_size=16, density=0.75)
x = torch.randn(5, 64)
with sk.use_backend("cpu"):
    y = layer(x)
torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.dense_weight(), layer.bias))
print(*[microkernel.microkernel_isa(f) for f in ("bsr", "conv", "lowrank")],
      "cpu" in available_backends("semi_forward", torch.device("cpu"), torch.float32))
"""


def _run(isa):
    env = {**os.environ, "SPARSEKERN_CPU_ISA": isa}
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("isa", microkernel.runnable_isas())
def test_every_family_runs_the_requested_path(isa):
    result = _run(isa)
    assert result.returncode == 0, result.stderr
    *paths, semi = result.stdout.split()
    fp32 = {"amx": "avx512f", "avx512": "avx512f", "avx2": "avx2-fma", "portable": "portable"}[isa]
    # bf16 products on AVX512-BF16 dot products (the avx512 path) or AMX tiles (the amx path): bsr and conv
    dot = "avx512f+avx512_bf16" if isa == "avx512" and cpu_flags()["avx512_bf16"] else fp32
    tiles = "avx512f+amx" if isa == "amx" else dot
    assert paths == [tiles, tiles, fp32]
    assert semi == str(isa != "portable")  # the 2:4 kernels have no portable path


def _missing_paths():
    """The paths this CPU cannot run (the test is skipped on a CPU that runs them all)."""
    missing = [name for name in microkernel.ISAS if name not in microkernel.runnable_isas()]
    if not missing:
        pytest.skip("this CPU runs every path")
    return missing


def test_a_path_the_cpu_lacks_is_an_error_naming_both():
    missing = _missing_paths()
    result = _run(missing[-1])
    assert result.returncode != 0
    assert (f"SPARSEKERN_CPU_ISA={missing[-1]}: this CPU cannot run the {missing[-1]} kernels "
            f"(the best it runs is {microkernel.cpu_isa()})") in result.stderr


def test_an_unknown_path_is_an_error():
    result = _run("sse2")
    assert result.returncode != 0 and "SPARSEKERN_CPU_ISA='sse2' is not a CPU path" in result.stderr


def test_set_isa_refuses_a_path_the_cpu_lacks_unless_on_portable_loops():
    missing = _missing_paths()
    with pytest.raises(ValueError, match=f"this CPU cannot run the {missing[-1]} kernels"):
        microkernel.set_isa("bsr", missing[-1])
    microkernel.set_isa("bsr", missing[-1], portable_loops=True)
    try:
        wide = missing[-1] in ("avx512", "amx")
        assert microkernel.microkernel_isa("bsr") == ("portable-wide" if wide else "portable")
    finally:
        microkernel.set_isa("bsr", None)
    assert microkernel.microkernel_isa("bsr") != "portable-wide"
