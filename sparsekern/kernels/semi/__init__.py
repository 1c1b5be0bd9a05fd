"""2:4 semi-structured products. Every backend implements the same ones:

W (N, K) is given compressed as ``values`` (N, K/2) and packed 2-bit ``indices``
uint8 (N, ceil(K/8)) (see :mod:`sparsekern.formats.semi`).

``semi_forward(x, values, indices, bias=None) -> y`` (+ bias: the dense composite fuses it into its GEMM)
    x (M, K): y = x @ W.T (+ bias), (M, N).
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

The dynamic-sparse-training products (``reference`` and ``cpu``), which the layer
and the DST methods call through the functions of :mod:`.products`:

``semi_drop_grow(mask, drop, grow, n_drop, transposable, absolute, with_weight) -> (new_mask, new_weight)``
    The ``n_drop`` kept entries of the bool 2:4 ``mask`` with the smallest ``drop``
    (``|drop|`` if ``absolute``) leave, ties to the lower flat index; each row group
    of four (4x4 tile if ``transposable``) regrows what it lost by largest ``grow``
    (``|grow|``): in a group, ties to the lower position; in a tile, the first of the
    transposable patterns containing its survivors with the largest total, summed in
    float64. new_weight (None unless ``with_weight``) is ``drop`` where kept before and
    after, else zero. ValueError if the mask is not exactly (transposable) 2:4 or
    ``n_drop`` is not in [0, kept entries].
``semi_restructure(mask, old_indices, transposable) -> (slots, indices, indices_t)``
    A new exact 2:4 bool mask (rows, cols) as packed ``indices``, those of its
    transpose (None unless ``transposable``), and the slot map int64 (rows, cols/2):
    for each new kept weight, its flat slot under ``old_indices``, or -1. ValueError
    naming the mask if it is not exactly (transposable) 2:4.
``semi_carry(tensor, slots) -> moved``
    ``tensor.flatten()[slots]``, zero where ``slots`` < 0 (shape of ``slots``).
``semi_decompress_sum(values, indices, cols) -> dense``
    The dense (rows, cols) sum of the compressed matrices ``zip(values, indices)``.
``semi_gather_kept(dense, indices) -> values``
    ``dense`` (rows, cols) read out at the kept positions ``indices`` encode, (rows, cols/2)
    in the order of compressed values (the inverse of decompressing). ValueError/RuntimeError
    naming the shapes if ``indices`` does not fit ``dense``.
"""
from . import reference, dst_reference  # noqa: F401  (register the reference backend)
from . import cpu, dst_cpu  # noqa: F401  (register the C++ backend, loaded on first use)
from . import dense  # noqa: F401  (registers the dense masked GEMM, the floor rule's composite)
from . import triton_prune  # noqa: F401  (registers the Triton prune+compress kernel, built on first use)
from . import cuda  # noqa: F401  (registers torch's semi-structured GPU matmul)
from .products import carry, decompress_sum, drop_grow, grad_weight, restructure

__all__ = ["carry", "decompress_sum", "drop_grow", "grad_weight", "restructure"]
