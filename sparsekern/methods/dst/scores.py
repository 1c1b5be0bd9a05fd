"""Dense-gradient block scores of a block-sparse layer for one step, without a dense weight update.

RigL, SNFS and GGR need, at an update step, the RMS of the dense gradient
dW = dYᵀX over every block (they grow where it is largest). Two exact ways:

- ``"product"``: the sampled-dW product on every block (a probe passed to
  ``bsr_linear(..., grad_probe=...)``; the layer's own blocks' gradient is taken
  from it). Costs one dense-sized dW: out·in·N multiply-adds for a batch of N.
- ``"gram"``: never forms dW. For block (r, c), with X_c the (N, bc) input
  columns and DY_r the (N, br) output-gradient columns of that block,
      ||DY_rᵀ X_c||²_F = <DY_r DY_rᵀ, X_c X_cᵀ>_F,
  so all block norms come from the per-block-column Gram matrices of X and
  of DY (N²·(in + out) multiply-adds) and one (R, N²) x (N², C) product
  (R·C·N²). For a batch of 128 and 32x32 blocks on a 2048x2048 layer that is
  1/4 of the product's work. Rounding: computed in the layer's dtype (fp16/bf16
  in float32); a few ulps relative on the large scores that decide growth,
  and tiny negative results are clamped to zero.

``"auto"`` (the default) picks "gram" for a layer when it needs at most half
the product's multiply-adds at the step's batch size (decided at the first
forward of the probe step), else "product". The layer's own blocks still get
their gradient from the normal sampled dW either way. A layer traced by
torch.compile always takes "product" (see :class:`ScoreProbe`), and so does a
SparseConv2d layer: its probe runs the conv weight-gradient product on every
block (all taps) inside the backward of ``sparse_conv2d``.
"""
import torch

from ...formats.bsr import BlockLayout, BlockSparseMatrix
from ...nn.conv2d import SparseConv2d
from ...ops.probe import BlockProbe

SCORE_METHODS = ("auto", "gram", "product")


def install_probe(layer, block_mask):
    """Make ``layer``'s next backward also compute its weight gradient on the blocks of
    ``block_mask`` (a SparseLinear's dYᵀX, a SparseConv2d's with all taps); returns the probe."""
    layout = BlockLayout.from_block_mask(block_mask.to(layer.block_mask.device), layer.padded_shape,
                                         layer.block_size)
    values = torch.zeros(layout.nnz_blocks, *layer.values.shape[1:], dtype=layer.values.dtype,
                         device=layout.device, requires_grad=True)
    probe = BlockProbe(values, layout) if isinstance(layer, SparseConv2d) else BlockSparseMatrix(values, layout)
    layer.grad_probe = probe
    return probe


def remove_probe(layer):
    layer.grad_probe = None


def probe_grad(probe, name):
    if probe.values.grad is None:
        raise RuntimeError(f"no gradient reached the probe of layer {name!r}: run forward and backward "
                           "between two calls of step()")
    return probe.values.grad


def block_rms(values):
    """(nnz, br, bc) -> (nnz,) RMS of each block, in float32 (fp64 stays fp64); a conv layer's
    (nnz, bs, bs, kh, kw) blocks count every tap."""
    v = values.detach()
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    if v.shape[0] == 0:
        return v.new_zeros(0, dtype=dtype)
    dims = tuple(range(1, v.dim()))
    return torch.linalg.vector_norm(v, dim=dims, dtype=dtype) / v[0].numel() ** 0.5


def gram_cheaper(layer, n):
    """True if the Gram route needs at most half the product's multiply-adds for a batch of ``n``."""
    (rows, cols), (br, bc) = layer.padded_shape, layer.block_size
    gram = n * n * (rows + cols) + (rows // br) * (cols // bc) * n * n
    return 2 * gram <= rows * cols * n


def _column_grams(a, width):
    """(N, K*width) -> (K, N*N): the Gram matrix of every group of ``width`` columns, flattened."""
    n = a.shape[0]
    groups = a.view(n, a.shape[1] // width, width).transpose(0, 1)  # explicit count: n may be 0
    return torch.bmm(groups, groups.transpose(1, 2)).reshape(groups.shape[0], n * n)


def gram_block_rms(x, dy, padded_shape, block_size):
    """(R, C) RMS over each (br, bc) block of dyᵀ x, without forming it.

    x: (N, in) and dy: (N, out), zero-padded here to ``padded_shape`` = (rows, cols).
    """
    (rows, cols), (br, bc) = padded_shape, block_size
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = torch.nn.functional.pad(x.to(dtype), (0, cols - x.shape[1]))
    dy = torch.nn.functional.pad(dy.to(dtype), (0, rows - dy.shape[1]))
    squares = _column_grams(dy, br) @ _column_grams(x, bc).T
    return squares.clamp_min_(0).div_(br * bc).sqrt_()


class ScoreProbe:
    """Dense-gradient block-RMS scores of one SparseLinear or SparseConv2d layer for the next step.

    ``method``: "gram", "product" or "auto" (see the module docstring). Installs the
    layer's ``grad_probe`` and hooks; :meth:`scores` returns the (R, C) grid after the
    backward; :meth:`remove` uninstalls everything.
    """

    def __init__(self, layer, method="auto"):
        if method not in SCORE_METHODS:
            raise ValueError(f"score method must be one of {SCORE_METHODS}, got {method!r}")
        if isinstance(layer, SparseConv2d):
            method = "product"  # the Gram identity is a linear layer's (no taps, no spatial shifts)
        self.layer, self.method = layer, method
        self.xs, self.dys = [], []   # inputs and output gradients, on the "gram" route
        self._gram = False if method == "product" else None  # None: decided at the first forward
        # Installed before any forward, for every method: a compiled forward does not run these
        # hooks (dynamo neither replays their per-call state nor sees hooks added after tracing)
        # but reads ``grad_probe`` into the traced op, recompiling once into a variant with the
        # probe. So compiled layers take the "product" route; in eager the first forward still
        # picks the route and drops this probe for "gram".
        self.product = install_probe(layer, torch.ones_like(layer.block_mask))
        self._handles = [] if method == "product" else [layer.register_forward_pre_hook(self._before),
                                                         layer.register_forward_hook(self._after)]

    def _before(self, module, args):
        if torch.compiler.is_compiling() or not torch.is_grad_enabled() or self._gram is not None:
            return
        n = args[0].numel() // max(args[0].shape[-1], 1)
        self._gram = self.method == "gram" or (self.method == "auto" and gram_cheaper(module, n))
        if self._gram:
            self.product = None
            remove_probe(module)

    def _after(self, module, args, output):
        if torch.compiler.is_compiling():
            return
        if self._gram and torch.is_grad_enabled() and output.requires_grad:
            call = len(self.xs)
            self.xs.append(args[0].detach().reshape(-1, module.in_features))
            self.dys.append(None)  # filled by the backward (which visits calls in reverse order)

            def keep(dy):
                self.dys[call] = dy.detach().reshape(-1, module.out_features)
            output.register_hook(keep)

    def scores(self, name):
        """(R, C) block RMS of the dense gradient of the last backward."""
        if self.product is not None:
            grad = probe_grad(self.product, name)
            grid = grad.new_zeros(self.product.layout.grid, dtype=torch.float64 if grad.dtype == torch.float64
                                  else torch.float32)
            layout = self.product.layout
            grid[layout.row_indices, layout.col_indices] = block_rms(grad)
            return grid
        if not self.dys or any(dy is None for dy in self.dys):
            raise RuntimeError(f"no gradient reached the probe of layer {name!r}: run forward and backward "
                               "between two calls of step()")
        # Several calls in one step: dW sums over all their rows, so stack them.
        return gram_block_rms(torch.cat(self.xs), torch.cat(self.dys), self.layer.padded_shape,
                              self.layer.block_size)

    def remove(self):
        for handle in self._handles:
            handle.remove()
        remove_probe(self.layer)
