"""Compile Triton kernels for GPU targets on a machine without a GPU, and read what
the compiler made of them: shared-memory pipeline depth (TTGIR), tensor-core
instruction shapes (PTX) and register spills (ptxas).

Works with triton 3.6 and 3.9. Callers should point TRITON_CACHE_DIR at a private
directory (compiles from several processes share the default cache).

    compiled = compile_kernel(fn, {"x_ptr": "*bf16", "n": "i32"}, {"BLOCK": 128}, arch=90,
                              num_warps=8, num_stages=4)
    smem_buffers(compiled)   # e.g. [4, 4]: buffers of each pipelined shared-memory tile
    wgmma_shapes(compiled)   # e.g. {(64, 128, 16)}
    wgmma_pendings(compiled) # e.g. [1]: wgmma groups left in flight at each wait
    spills(compiled)         # (spill store bytes, spill load bytes), (0, 0) when none
"""
import contextlib
import functools
import inspect
import io
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_DIVISIBLE_16 = [["tt.divisibility", 16]]


def _jit(fn):
    return fn if isinstance(fn, triton.runtime.JITFunction) else triton.jit(fn)


def compile_kernel(fn, signature, constexprs, arch=90, num_warps=4, num_stages=3, aligned=None):
    """Compile ``fn`` (a plain function or a ``@triton.jit`` one) for ("cuda", arch, 32).

    ``signature`` maps runtime argument names to triton types ("*bf16", "i32", ...);
    every other parameter is a constexpr and must be in ``constexprs``. ``aligned``
    names the arguments the launcher would specialize as multiples of 16 (pointers of
    fresh torch allocations, strides and sizes divisible by 16); by default every
    pointer argument, as at a launch on whole tensors. Returns the compiled kernel
    (``.asm`` holds "ttir", "ttgir", "llir", "ptx", "cubin"; ``.metadata.shared`` the
    shared-memory bytes).
    """
    jitted = _jit(fn)
    params = list(inspect.signature(jitted.fn).parameters)
    unknown = set(signature) - set(params)
    missing = set(params) - set(signature) - set(constexprs)
    if unknown or missing:
        raise ValueError(f"unknown arguments {sorted(unknown)}, missing constexprs {sorted(missing)}")
    if aligned is None:
        aligned = [name for name, kind in signature.items() if kind.startswith("*")]
    # ASTSource matches the signature by position: list it in the kernel's argument order.
    full = {name: signature.get(name, "constexpr") for name in params}
    attrs = {(params.index(name),): _DIVISIBLE_16 for name in aligned}
    source = ASTSource(jitted, full, dict(constexprs), attrs)
    # Keep the ptxas report of the compile itself (printed when the knob is set); a
    # cache hit runs no ptxas, and ptxas_report then assembles the PTX again.
    from triton import knobs
    dump, log = knobs.nvidia.dump_ptxas_log, io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    compiled.ptxas_log = log.getvalue() if "spill stores" in log.getvalue() else None
    return compiled


_ALLOC = re.compile(r"ttg\.local_alloc\s*(?:\{[^}]*\})?\s*:\s*\(\)\s*->\s*!ttg\.memdesc<([0-9x]+)x[a-z]")


def smem_buffers(compiled):
    """Buffer counts of the pipelined shared-memory tiles: the leading dimension of
    each multi-buffered ``ttg.local_alloc`` (one of rank >= 3: buffers x tile) in the
    TTGIR. Empty when no loop was pipelined (tiles staged through one buffer each)."""
    counts = []
    for dims in _ALLOC.findall(compiled.asm["ttgir"]):
        dims = [int(d) for d in dims.split("x")]
        if len(dims) >= 3:
            counts.append(dims[0])
    return counts


def async_waits(compiled):
    """The ``num`` of every ``ttg.async_wait`` in the TTGIR (0: waits for all copies in
    flight, i.e. no overlap of loads with the following dot)."""
    return [int(n) for n in re.findall(r"ttg\.async_wait[^\n]*\{num = (\d+)", compiled.asm["ttgir"])]


def wgmma_pendings(compiled):
    """The ``pendings`` of every ``ttng.warp_group_dot_wait`` in the TTGIR: how many wgmma
    groups may stay in flight there (0: each dot is waited for before the next is issued)."""
    return [int(n) for n in re.findall(r"warp_group_dot_wait[^\n]*\{pendings = (\d+)", compiled.asm["ttgir"])]


def wgmma_shapes(compiled):
    """(m, n, k) of every Hopper ``wgmma.mma_async`` instruction in the PTX."""
    return {tuple(int(v) for v in shape)
            for shape in re.findall(r"wgmma\.mma_async[.a-z]*\.m(\d+)n(\d+)k(\d+)", compiled.asm["ptx"])}


def mma_shapes(compiled):
    """(m, n, k) of every Ampere-style ``mma.sync`` instruction in the PTX."""
    return {tuple(int(v) for v in shape)
            for shape in re.findall(r"\bmma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", compiled.asm["ptx"])}


@functools.cache
def _ptxas(arch):
    """ptxas as triton's own compile runs it for ``arch`` (triton 3.9 ships a second,
    newer ptxas for sm_90+ and works around a register-allocation bug of ptxas 13)."""
    from triton.backends.nvidia import compiler
    tool = compiler.get_ptxas(arch) if inspect.signature(compiler.get_ptxas).parameters else compiler.get_ptxas()
    make_cubin = inspect.getsource(compiler.CUDABackend.make_cubin)
    flags = ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in make_cubin else []
    return [tool.path, *flags]


def ptxas_report(compiled):
    """The ``ptxas -v`` report of the kernel's PTX for its target (registers, spills)."""
    if getattr(compiled, "ptxas_log", None):
        return compiled.ptxas_log
    arch = compiled.metadata.target.arch
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = f"{tmp}/kernel.ptx"
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        command = [*_ptxas(arch), "-v", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o", f"{tmp}/kernel.cubin"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    return result.stderr + result.stdout


def spills(compiled):
    """(spill store bytes, spill load bytes) that ptxas reports: (0, 0) when none."""
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_report(compiled))
    if match is None:
        raise RuntimeError("no spill line in the ptxas report")
    return int(match.group(1)), int(match.group(2))


def registers(compiled):
    """Registers per thread that ptxas reports."""
    match = re.search(r"Used (\d+) registers", ptxas_report(compiled))
    if match is None:
        raise RuntimeError("no register line in the ptxas report")
    return int(match.group(1))


_SSA = re.compile(r"\s*(%[\w.#]+)(?::\d+)? = ([\w.]+)(.*)")
_LOOP = re.compile(r"scf\.for (%[\w.#]+) = (%[\w.#]+) to (%[\w.#]+)")
_BINDING = re.compile(r"(%[\w.#]+) = (%[\w.#]+)")


def narrow_index_products(compiled, sizes):
    """Lines of the TTIR that multiply, in 32 bits, an index (derived from a program id,
    a loop counter or a ``tl.arange``) by a value derived from one of the integer
    arguments ``sizes`` (strides, element counts), or add such a 32-bit value to a
    pointer: past 2**31 elements the product wraps. Loaded values are data and start
    no dependency. Empty when every such offset is computed in 64 bits."""
    index, size = set(), {f"%{name}" for name in sizes}
    found = []
    for line in compiled.asm["ttir"].splitlines():
        match = _SSA.match(line)
        if match is None:
            continue
        name, op, rest = match.groups()
        body, _, types = rest.partition(" loc(")[0].rpartition(" : ")
        operands = set(re.findall(r"%[\w.#]+", body))
        if op in ("tt.get_program_id", "tt.make_range"):
            index.add(name)
            continue
        if op == "tt.load":
            continue
        if op == "scf.for":  # the counter and the loop-carried values inherit from their sources
            counter, low, high = _LOOP.search(line).groups()
            index.add(counter)
            if {low, high} & size:
                size.add(counter)
            for carried, source in _BINDING.findall(rest.partition("iter_args")[2]):
                index.update([carried] if source in index else [])
                size.update([carried] if source in size else [])
        if op == "tt.addptr":  # (pointer, offset): only the offset is an index
            operands = set(re.findall(r"%[\w.#]+", body)[1:])
        from_index, from_size = bool(operands & index), bool(operands & size)
        narrow = re.search(r"(^|[x<\s,])i32>?\s*$", types) is not None
        if op in ("arith.muli", "tt.addptr") and from_index and from_size and narrow:
            found.append(line.strip())
        if op == "tt.addptr":
            continue
        if from_index:
            index.add(name)
        if from_size:
            size.add(name)
    return found
