"""The machine and software a measurement ran on: CPU model and ISA flags, versions, threads, and
the kernel path the registry picks. Named in every table header and JSON row (the CLI's and
bench/'s: bench/timing.py re-exports these)."""
import functools
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from .. import kernels

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def _cpuinfo(field):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model():
    return _cpuinfo("model name") or platform.processor() or platform.machine()


@functools.cache
def l1_data_cache():
    """cpu0's L1 data cache from sysfs: {"ways", "sets", "line"} (ints), or None where Linux does not
    say. The CPU tiles hold no more rows of one L1 set than it has ways (csrc/common/cache_sets.h),
    so the ways shape the kernels' speed and are named with every measurement."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        indices = sorted(name for name in os.listdir(root) if name.startswith("index"))
    except OSError:
        return None
    for index in indices:
        try:
            fields = {name: Path(root, index, name).read_text().strip() for name in
                      ("level", "type", "ways_of_associativity", "number_of_sets", "coherency_line_size")}
            if fields["level"] == "1" and fields["type"] == "Data":
                return {"ways": int(fields["ways_of_associativity"]), "sets": int(fields["number_of_sets"]),
                        "line": int(fields["coherency_line_size"])}
        except (OSError, ValueError):
            continue
    return None


def describe_l1d(cache):
    """ "L1d 32 KiB 8-way" from l1_data_cache(), or "" when unknown."""
    if not cache:
        return ""
    return f"L1d {cache['ways'] * cache['sets'] * cache['line'] // 1024} KiB {cache['ways']}-way"


def cpu_flags():
    """Which of the ISA extensions that decide the microkernels this CPU has."""
    present = set((_cpuinfo("flags") or "").split())
    return {flag: flag in present for flag in ISA_FLAGS}


def describe_flags(flags):
    """"avx2 fma (no avx512f avx512_bf16 amx_bf16)" from a cpu_flags() dict."""
    have = " ".join(f for f, on in flags.items() if on)
    lack = " ".join(f for f, on in flags.items() if not on)
    return " ".join(filter(None, [have, lack and (f"(no {lack})" if have else f"no {lack}")]))


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


@functools.cache
def triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@functools.cache
def mkl_path():
    """The code path MKL takes on this CPU, from its verbose log of one small GEMM in a child
    process (e.g. "Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors";
    "Intel(R) Architecture processors" is its generic path), or None if unknown."""
    if not torch.backends.mkl.is_available():
        return None
    code = "import torch; a = torch.ones(64, 64); a @ a"
    try:
        log = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "MKL_VERBOSE": "1"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"for Intel\(R\) 64 architecture (.*?), Lnx", log)
    return found.group(1) if found else None


def environment(device=torch.device("cpu")):
    """The machine and software fields of every JSON row (read when called: threads may have been set)."""
    return dict(device=device_name(device), cpu=cpu_model(), cpu_cores=os.cpu_count(), cpu_flags=cpu_flags(),
                l1d=describe_l1d(l1_data_cache()) or None, threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton_version(), thp_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE"), mkl=mkl_path())


def kernel_path(product, device, dtype):
    """The backend the registry picks for ``product`` (a forced ``sk.use_backend`` included) and, on
    CPU, the ISA of the compiled family's microkernel ("unavailable" when it is not built; for
    2:4, what its kernels run in ``dtype``)."""
    backend = kernels.select_kernel(product, device, dtype)[0]
    isa = None
    family = product.split("_")[0]  # bsr_* -> the bsr family
    if device.type == "cpu" and family == "semi":
        isa = kernels.semi.cpu.kernel_isa(dtype) if backend == "cpu" else None
    elif device.type == "cpu":
        isa = kernels.microkernel.microkernel_isa(family)
    return {"backend": backend, "isa": isa}


def header(env, path):
    """The first header line: device, CPU model and ISA flags, versions, threads, kernel path."""
    host = f" (host {env['cpu']})" if env["device"] != env["cpu"] else ""
    l1d = f", {env['l1d']}" if env.get("l1d") else ""
    text = (f"{env['device']}{host}, {describe_flags(env['cpu_flags'])}{l1d}, torch {env['torch']}, "
            f"{env['threads']} threads, backend {path['backend']}")
    text += f", microkernel {path['isa']}" if path.get("isa") else ""
    return text + (f"; MKL path: {env['mkl']}" if env.get("mkl") else "")
