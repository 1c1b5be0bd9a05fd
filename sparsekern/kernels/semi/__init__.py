"""2:4 semi-structured products. Every backend implements the same ones:

W (N, K) is given compressed as ``values`` (N, K/2) and packed 2-bit ``indices``
uint8 (N, ceil(K/8)) (see :mod:`sparsekern.formats.semi`).

``semi_forward(x, values, indices) -> y``
    x (M, K): y = x @ W.T, (M, N).
``semi_grad_input(dy, values, indices, indices_t=None, transpose_map=None) -> dx``
    dy (M, N): dx = dy @ W, (M, K). With Wᵀ's indices (cols, ceil(rows/8)) and
    the gather map (cols, rows/2) into ``values`` (transposable W), it is the
    forward product on Wᵀ, whose values are read out of W's; otherwise the
    product with W as stored (row-wise 2:4).
``semi_grad_weight(dy, x, indices) -> dvalues``
    The sampled product (dy.T @ x) at the kept positions of W only: (N, K/2).
``semi_prune_compress(dense, transposable) -> (values, indices, values_t, indices_t)``
    Prune a dense (N, K) weight to 2:4 (transposable: per 4x4 tile) and compress
    it; also Wᵀ compressed when ``transposable`` (else the last two are None).

Inputs arrive contiguous, on one device, of one floating dtype (checked by the
op layer). Outputs are new tensors of the input dtype; half types accumulate in
fp32. M may be 0.
"""
from . import reference  # noqa: F401  (registers the reference backend)
from . import cpu  # noqa: F401  (registers the C++ backend, loaded on first use)
from . import triton_prune  # noqa: F401  (registers the Triton prune+compress kernel, built on first use)
from . import cuda  # noqa: F401  (registers torch's semi-structured GPU matmul)

PRODUCTS = ("semi_forward", "semi_grad_input", "semi_grad_weight", "semi_prune_compress")
