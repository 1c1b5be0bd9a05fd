"""Lazy loading of the compiled extensions (``sparsekern._C_<name>``).

Nothing is imported at ``import sparsekern`` time: a backend asks for its
extension on first use. Loading a module registers its kernels as dispatcher ops
(``torch.ops.sparsekern.<name>_*_cpu``). A missing or broken build gives one
warning line naming the module and the reason, and the backend reports itself
unavailable, so the reference backend keeps working.
"""
import importlib
import warnings

import torch

_loaded = {}
_failures = {}
_with_fakes = set()


def load_extension(name):
    """Return the module ``sparsekern._C_<name>``, or None if it cannot be loaded."""
    if name in _loaded:
        return _loaded[name]
    module = None
    try:
        module = importlib.import_module(f"sparsekern._C_{name}")
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        _failures[name] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"sparsekern: compiled extension _C_{name} unavailable ({_failures[name]}); "
            "its backend is disabled. Build it with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=2,
        )
    if module is not None:
        from .kernels.microkernel import apply_requested_isa  # noqa: PLC0415  (kernels imports this module)
        apply_requested_isa(name, module)
    _loaded[name] = module
    return module


def load_ops(name, register_fakes):
    """``torch.ops.sparsekern`` once ``sparsekern._C_<name>`` has registered its ops, or None if it
    cannot be loaded. ``register_fakes()`` runs once, right after the first load: torch accepts a
    fake implementation only for an op that already exists."""
    if load_extension(name) is None:
        return None
    if name not in _with_fakes:
        register_fakes()
        _with_fakes.add(name)
    return torch.ops.sparsekern


def extension_failure(name):
    """Why ``load_extension(name)`` returned None (after it was tried), else None."""
    return _failures.get(name)


def cpu_extension_unavailable(name, dtypes, device, dtype):
    """The availability probe of a C++ cpu backend on ``sparsekern._C_<name>``: None,
    or why it cannot run tensors of ``device`` / ``dtype``."""
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors only, not {device.type}"
    if dtype not in dtypes:
        return f"dtype {dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
    if load_extension(name) is None:
        return f"the compiled extension sparsekern._C_{name} is unavailable ({extension_failure(name)})"
    return None


def loaded_extension(name):
    """``sparsekern._C_<name>`` if it is loaded already, else None (never triggers a load)."""
    return _loaded.get(name)


def loaded_extensions():
    """The compiled extensions loaded so far (never triggers a load)."""
    return [module for module in _loaded.values() if module is not None]
