"""The package's shape: layers import only downward, compiled code is reached only through
the kernels layer, and every family keeps one name at every level."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparsekern"
# Lowest first; a module may import its own layer and the ones before it.
LAYERS = ("formats", "kernels", "ops", "nn", "methods")
# family token: the stem of its op, layer and benchmark files
FAMILIES = {"bsr": "bsr_linear", "semi": "semi_linear", "lowrank": "lowrank_linear", "conv": "conv2d"}
# An import of a compiled module, an attribute read off one, or the loader itself (not a mention in prose).
_COMPILED_USE = re.compile(r"(import|from)\s+sparsekern\._C_|_C_\w+\.\w|load_extension\(|load_ops\(")


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _layer(path):
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if parts[0] in LAYERS else None


def _imported_packages(path):
    """(top-level sparsekern sub-package or module, line) of every import inside sparsekern."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = (*base, *(node.module.split(".") if node.module else ()))
            else:
                target = tuple((node.module or "").split("."))
            if target[:1] != ("sparsekern",):
                continue
            if len(target) == 1:  # from sparsekern import x / from . import x
                for alias in node.names:
                    yield alias.name, node.lineno
            else:
                yield target[1], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name.split(".")
                if target[0] == "sparsekern" and len(target) > 1:
                    yield target[1], node.lineno


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_only_downward(path):
    layer = _layer(path)
    if layer is None:
        return
    allowed = set(LAYERS[:LAYERS.index(layer) + 1])
    if layer != "formats":
        allowed.add("_extension")
    for imported, line in _imported_packages(path):
        if imported in LAYERS or imported == "_extension":
            assert imported in allowed, f"{path.relative_to(ROOT)}:{line} ({layer}) imports {imported}"
        if imported == "_extension":
            assert layer == "kernels", f"{path.relative_to(ROOT)}:{line}: only kernels/ loads compiled code"


@pytest.mark.parametrize("folder", ["sparsekern", "tests", "bench"])
def test_compiled_modules_are_reached_only_through_the_kernels_layer(folder):
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("sparsekern", "kernels") or rel == pathlib.Path("sparsekern/_extension.py") \
                or path == pathlib.Path(__file__):
            continue
        if _COMPILED_USE.search(path.read_text()):
            offenders.append(str(rel))
    assert not offenders, f"compiled extensions used outside sparsekern/kernels/: {offenders}"


def test_one_folder_per_family_at_every_level():
    for family, stem in FAMILIES.items():
        assert (PACKAGE / "kernels" / family / "__init__.py").exists()
        assert (ROOT / "csrc" / family).is_dir()
        assert (PACKAGE / "ops" / f"{stem}.py").exists()
        assert (PACKAGE / "nn" / f"{stem}.py").exists()
        assert list((ROOT / "tests").glob(f"test_{family}_*.py"))
        assert list((ROOT / "bench").glob(f"bench_{stem}*.py"))
    assert (PACKAGE / "formats" / "bsr.py").exists() and (PACKAGE / "formats" / "semi.py").exists()
    assert (PACKAGE / "formats" / "lowrank.py").exists()
