"""2:4 compressed format: kept values + packed 2-bit indices (optionally also for Wᵀ).

A (rows, cols) matrix with at most two nonzeros in every group of four
consecutive entries of a row is stored as

  values   (rows, cols/2)        the two kept entries of every group, in column order
  indices  (rows, ceil(cols/8))  uint8; each kept entry's position inside its group
                                 (2 bits), four entries per byte, lowest bits first

i.e. 2 bits of metadata per kept value: 0.53x the dense bytes for fp32 and 0.56x
for bf16/fp16. A *transposable* matrix (two kept per row and per column of
every 4x4 tile) can also carry the same compression of its transpose
(``values_t``, ``indices_t``), so dX = dY W runs on the sparse path too.
"""
import torch

from .semi_prune import check_2to4_mask, check_2to4_shape, prune_2to4


def pack_indices(positions):
    """(rows, n) ints in [0, 4) -> uint8 (rows, ceil(n/4)), entry j in bits 2*(j%4) of byte j//4."""
    rows, n = positions.shape
    padded = torch.zeros(rows, -(-n // 4) * 4, dtype=torch.int32, device=positions.device)
    padded[:, :n] = positions
    weights = torch.tensor([1, 4, 16, 64], dtype=torch.int32, device=positions.device)
    return (padded.view(rows, padded.shape[1] // 4, 4) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_columns(indices, cols):
    """Packed indices -> int64 (rows, cols/2): the column of every kept value."""
    rows = indices.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=indices.device)
    in_group = ((indices.unsqueeze(-1) >> shifts) & 3).view(rows, 4 * indices.shape[1])[:, :cols // 2].long()
    group_start = torch.arange(cols // 2, device=indices.device).div(2, rounding_mode="floor") * 4
    return in_group + group_start


# Group mask as a 4-bit code (bit p = position p kept) -> the two kept positions, ascending.
# Codes with other than two bits never occur (callers pass exactly-2:4 masks).
_POSITIONS = [([p for p in range(4) if code >> p & 1] + [0, 0])[:2] for code in range(16)]


def kept_positions(mask):
    """For a mask with exactly two True per group of 4: (rows, cols/2) positions in [0, 4), ascending."""
    rows, cols = mask.shape
    bits = torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=mask.device)
    codes = (mask.view(rows, cols // 4, 4).to(torch.uint8) * bits).sum(-1, dtype=torch.uint8).long()
    table = torch.tensor(_POSITIONS, dtype=torch.int64, device=mask.device)
    return table[codes].view(rows, cols // 2)


def compress(dense, mask):
    """(values, packed indices) of ``dense`` on ``mask`` (exactly two True per group of 4)."""
    rows, cols = dense.shape
    positions = kept_positions(mask)
    values = dense.reshape(rows, cols // 4, 4).gather(-1, positions.view(rows, cols // 4, 2))
    return values.reshape(rows, cols // 2), pack_indices(positions)


def decompress(values, indices, cols):
    """Dense (rows, cols) from compressed values/indices; differentiable with respect to ``values``.

    One scatter. Layers and methods that need no gradient call the
    ``semi_decompress_sum`` kernel instead (:func:`sparsekern.kernels.semi.decompress_sum`).
    """
    rows = values.shape[0]
    return values.new_zeros(rows, cols).scatter(1, unpack_columns(indices, cols), values)


def transpose_permutation(indices, indices_t, shape):
    """int64 (cols, rows/2): for each kept value of Wᵀ, its flat position in W's ``values``.

    ``values_t = values.reshape(-1)[perm]`` then turns W's values into Wᵀ's in one gather.
    """
    rows, cols = shape
    slots = torch.full((rows, cols), -1, dtype=torch.int64, device=indices.device)
    flat = torch.arange(rows * (cols // 2), device=indices.device).view(rows, cols // 2)
    slots.scatter_(1, unpack_columns(indices, cols), flat)
    return slots.T.gather(1, unpack_columns(indices_t, rows))


def check_indices(indices, cols, name="indices"):
    """ValueError unless every group's two packed positions are distinct and ascending (the only
    encoding compress() writes): anything else would place two values on one weight."""
    positions = (unpack_columns(indices, cols) % 4).view(indices.shape[0], cols // 4, 2)
    if positions.numel() and not bool((positions[..., 0] < positions[..., 1]).all()):
        row, group = (int(i) for i in (positions[..., 0] >= positions[..., 1]).nonzero()[0])
        raise ValueError(f"{name} of shape {tuple(indices.shape)}: group {group} of row {row} does not hold two "
                         "distinct ascending positions")


def _checked_transpose_map(indices, indices_t, shape):
    """int32 transpose map, or ValueError if ``indices_t`` is not the transpose of ``indices``
    (the map would point outside ``values``; a compiled graph skips the check, the C++ kernels
    refuse such a map themselves)."""
    rows, cols = shape
    if rows * (cols // 2) >= 2 ** 31:
        raise ValueError(f"a {shape} matrix has too many kept values for an int32 transpose map")
    perm = transpose_permutation(indices, indices_t, shape)
    if not torch.compiler.is_compiling() and perm.numel() and not bool((perm >= 0).all()):
        col, slot = (int(i) for i in (perm < 0).nonzero()[0])
        raise ValueError(f"indices_t is not the transpose of indices for a {shape} matrix: kept value {slot} of "
                         f"Wᵀ's row {col} is not kept in W (a state dict or matrix mixed from two layers?)")
    return perm.to(torch.int32)


class SemiStructuredMatrix:
    """A 2:4 sparse (rows, cols) matrix in compressed form (see the module docstring).

    ``values`` is a plain tensor: give it ``requires_grad`` and the gradients of
    :func:`sparsekern.ops.semi_linear` land on the kept entries only.
    """

    def __init__(self, values, indices, shape, values_t=None, indices_t=None):
        rows, cols = shape
        if tuple(values.shape) != (rows, cols // 2):
            raise ValueError(f"values has shape {tuple(values.shape)}, expected {(rows, cols // 2)} for {shape}")
        if indices.dtype != torch.uint8 or tuple(indices.shape) != (rows, -(-cols // 8)):
            raise ValueError(f"indices must be uint8 of shape {(rows, -(-cols // 8))}, got "
                             f"{indices.dtype} {tuple(indices.shape)}")
        if values_t is not None and indices_t is None:
            raise ValueError("values_t needs indices_t")
        if indices_t is not None and (indices_t.dtype != torch.uint8 or tuple(indices_t.shape) != (cols, -(-rows // 8))):
            raise ValueError(f"indices_t must be uint8 of shape {(cols, -(-rows // 8))}, got "
                             f"{indices_t.dtype} {tuple(indices_t.shape)}")
        self.values, self.indices, self.shape = values, indices, (int(rows), int(cols))
        # Wᵀ's indices; its values either stored (values_t) or gathered from ``values`` (transpose_map).
        self.values_t, self.indices_t = values_t, indices_t
        self._transpose_map = None
        if not torch.compiler.is_compiling():  # a compiled layer's indices were checked when it got them
            check_indices(indices, cols, "indices")
            if indices_t is not None:
                check_indices(indices_t, rows, "indices_t")
                self._transpose_map = _checked_transpose_map(indices, indices_t, self.shape)

    @classmethod
    def from_dense(cls, dense, *, mask=None, with_transpose=False):
        """Exact compression of a 2:4 ``dense`` (ValueError if some group of 4 has > 2 nonzeros).

        mask: optional bool (rows, cols) with exactly two True per group of four
        (entries outside it must be zero); by default the nonzeros, topped up with
        zeros. ``with_transpose`` also stores Wᵀ compressed (needs a transposable pattern).
        """
        if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
            raise ValueError(f"dense must be a 2-D tensor, got shape "
                             f"{tuple(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__}")
        check_2to4_shape(dense.shape, with_transpose)
        dense = dense.detach()
        nonzero = dense.ne(0)
        if mask is None:
            # Kept set = the nonzeros, topped up with zeros (to a transposable tile pattern if asked).
            mask = prune_2to4(nonzero, transposable=with_transpose)
        elif mask.dtype != torch.bool or mask.shape != dense.shape:
            raise ValueError(f"mask must be bool of shape {tuple(dense.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        else:
            check_2to4_mask(mask, with_transpose)
        lost = nonzero & ~mask
        if bool(lost.any()):
            row, col = (int(i) for i in lost.nonzero()[0])
            what = "transposable 2:4 (2 per row and column of every 4x4 tile)" if with_transpose else "2:4"
            raise ValueError(f"dense {tuple(dense.shape)} is not {what}: the entry at ({row}, {col}) "
                             "is nonzero but outside the kept pattern; prune it first (sparsekern.prune_2to4)")
        values, indices = compress(dense, mask)
        values_t = indices_t = None
        if with_transpose:
            values_t, indices_t = compress(dense.T, mask.T)
        return cls(values, indices, dense.shape, values_t, indices_t)

    def with_values(self, values):
        """The same structure (indices, transpose map already built) holding ``values`` instead,
        e.g. the same weights cast for autocast; nothing is checked or rebuilt again."""
        if tuple(values.shape) != tuple(self.values.shape):
            raise ValueError(f"values has shape {tuple(values.shape)}, expected {tuple(self.values.shape)}")
        other = SemiStructuredMatrix.__new__(SemiStructuredMatrix)
        other.__dict__.update(self.__dict__)
        other.values = values
        return other

    dtype = property(lambda self: self.values.dtype)
    device = property(lambda self: self.values.device)
    has_transpose = property(lambda self: self.indices_t is not None)

    def transpose_map(self):
        """int32 (cols, rows/2), cached: ``values.reshape(-1)[map]`` are Wᵀ's compressed values."""
        if self.indices_t is None:
            raise ValueError("this matrix carries no transpose (build it with with_transpose=True)")
        if self._transpose_map is None:
            self._transpose_map = _checked_transpose_map(self.indices, self.indices_t, self.shape)
        return self._transpose_map

    @property
    def nbytes(self):
        """Bytes actually stored (values and indices, and those of Wᵀ when kept)."""
        tensors = [self.values, self.indices, self.values_t, self.indices_t]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def mask(self):
        """Bool (rows, cols): the kept positions."""
        ones = torch.ones(self.values.shape, dtype=torch.bool, device=self.device)
        return decompress(ones, self.indices, self.shape[1])

    def to_dense(self):
        """The dense (rows, cols) matrix; differentiable with respect to ``values``."""
        return decompress(self.values, self.indices, self.shape[1])

    def __repr__(self):
        return (f"SemiStructuredMatrix(shape={self.shape}, dtype={self.dtype}, device={self.device}, "
                f"with_transpose={self.has_transpose})")
