"""``sparsekern info``: what this installation will run on this machine, on one screen.

Versions, the CPU and the ISA flags that decide the microkernels, threads, which compiled
extensions are built, the backend the registry picks for every product on CPU float32,
bfloat16 and float16 (and CUDA when there is a GPU), and why the other backends cannot run.
"""
import os
import platform

import torch

from .. import __file__ as package_file
from .. import __version__, kernels
from ..kernels.bsr import cpu as bsr_cpu
from ..kernels.registry import BACKEND_NAMES
from .machine import cpu_flags, cpu_model, describe_flags, describe_l1d, l1_data_cache, triton_version

PRODUCTS = ("bsr_forward", "bsr_grad_input", "bsr_grad_weight", "conv_forward", "conv_grad_input",
            "conv_grad_weight", "semi_forward", "semi_grad_input", "semi_grad_weight", "lowrank_forward",
            "lowrank_backward")
FAMILIES = ("bsr", "conv", "semi", "lowrank")
# How each family's automatic cpu choice also depends on the call (kernels/floor.py).
_MEASURED = ("the first calls of each shape class time the cpu kernel against the dense composite and keep the "
             "kernel only where its median is at least 5 % lower")
FLOOR_RULE = {"bsr": f"bsr products: {_MEASURED} (dense masked GEMM)",
              "conv": f"conv products: {_MEASURED} (dense F.conv2d; dX and dW as one dense backward)",
              "semi": f"semi products: {_MEASURED} (decompressed W and GEMM)",
              "lowrank": f"lowrank products: {_MEASURED} (the same schedule on torch GEMMs)"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def add_parser(subparsers):
    p = subparsers.add_parser("info", help="versions, CPU and ISA flags, built extensions, kernel backends",
                              description=__doc__.split("\n\n")[0])
    p.set_defaults(run=run)
    return p


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def unavailable_reason(product, backend, device, dtype):
    """None when ``backend`` can run ``product`` on such tensors, "" when it does not implement
    it, else the registry probe's sentence."""
    try:
        kernels.select_kernel(product, device, dtype, backend=backend)
    except kernels.BackendUnavailableError as exc:
        message = str(exc)
        if "does not implement" in message:
            return ""
        # "backend 'x' cannot run 'p' on cpu torch.float32: <the probe's sentence>"
        return message.partition(f"{dtype}: ")[2] or message
    return None


def _extensions():
    parts = []
    for family in FAMILIES:
        isa = kernels.microkernel.microkernel_isa(family)
        if isa == "unavailable":
            parts.append(f"_C_{family} NOT BUILT")
        else:
            parts.append(f"_C_{family} built" + (f" (microkernel {isa})" if isa else ""))
    return ", ".join(parts)


def _cpu_path():
    best = kernels.microkernel.cpu_isa()
    requested = os.environ.get("SPARSEKERN_CPU_ISA")
    text = f"{best} is the best this CPU runs" + (f"; SPARSEKERN_CPU_ISA={requested}" if requested else "")
    return text + f"; floor rule {kernels.floor.floor_mode()} (SPARSEKERN_FLOOR)"


def _bf16_blocks():
    """How the bsr kernels compute bf16 at block sizes 32, 16 and 8 on the current path."""
    if bsr_cpu.bf16_engine(32) == "unavailable":
        return []
    return ["bf16 block-sparse on this path: " + ", ".join(f"block {b} {bsr_cpu.bf16_engine(b)}" for b in (32, 16, 8))]


def _gpu_lines():
    if not torch.cuda.is_available():
        built = "torch built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
        return [f"GPU: none ({built})"]
    lines = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return lines


def _backend_table(devices):
    columns = [(device, dtype) for device in devices for dtype in DTYPES]
    names = [f"{device.type} {_dtype_name(dtype)}" for device, dtype in columns]
    lines = [f"  {'product':18} " + " ".join(f"{n:>16}" for n in names)]
    reasons = {}  # (backend, sentence) -> {product: set of dtype names}
    for product in PRODUCTS:
        picked = []
        for device, dtype in columns:
            picked.append(kernels.select_kernel(product, device, dtype)[0])
            for backend in BACKEND_NAMES:
                reason = unavailable_reason(product, backend, device, dtype)
                if reason:
                    reasons.setdefault((backend, f"on {device.type}: {reason}"), {}).setdefault(
                        product, set()).add(_dtype_name(dtype))
        lines.append(f"  {product:18} " + " ".join(f"{p:>16}" for p in picked))
    lines += [f"  {note}" for family, note in FLOOR_RULE.items() if any(p.startswith(family) for p in PRODUCTS)]
    if kernels.floor.fp16_without_hardware():
        lines.append("  float16 on cpu: the kernels unmeasured (no AVX512-FP16 or AMX-FP16 here: torch's fp16 "
                     "GEMMs and convolutions are not vectorised for fp16)")
    lines.append("not available:")
    for (backend, reason), products in reasons.items():
        dtypes = set().union(*products.values())
        scope = "" if len(dtypes) == len(DTYPES) else f" ({', '.join(sorted(dtypes))})"
        lines.append(f"  {backend} for {', '.join(products)}{scope} {reason}")
    return lines


def report():
    """The info text."""
    flags = cpu_flags()
    triton = triton_version()
    l1d = describe_l1d(l1_data_cache())  # "" where sysfs does not say
    lines = [
        f"sparsekern {__version__} ({os.path.dirname(package_file)})",
        f"torch {torch.__version__}, triton {triton or 'not installed'}, python {platform.python_version()}",
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; {describe_flags(flags)}" + (f"; {l1d}" if l1d else ""),
        f"threads: torch {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
        + "".join(f", {v}={os.environ[v]}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if v in os.environ),
        f"compiled extensions: {_extensions()}",
        f"CPU path: {_cpu_path()}",
        *_bf16_blocks(),
        *_gpu_lines(),
    ]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines.append("backend the registry picks for each product (sparsekern.use_backend forces another):")
    lines += _backend_table(devices)
    return "\n".join(lines)


def run(args):
    print(report())
    return 0
