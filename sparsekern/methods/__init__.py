"""Methods: pure functions (densities, scores, masks) and thin drivers that apply them to sparsekern layers."""
from .density import er_densities, erk_densities, layer_densities, uniform_densities  # noqa: F401
