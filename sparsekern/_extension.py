"""Lazy loading of the compiled extensions (``sparsekern._C_<name>``).

Nothing is imported at ``import sparsekern`` time: a backend asks for its
extension on first use. A missing or broken build gives one warning line naming
the module and the reason, and the backend reports itself unavailable, so the
reference backend keeps working.
"""
import importlib
import warnings

_loaded = {}
_failures = {}


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
    _loaded[name] = module
    return module


def extension_failure(name):
    """Why ``load_extension(name)`` returned None (after it was tried), else None."""
    return _failures.get(name)
