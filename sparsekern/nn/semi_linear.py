"""``SemiSparseLinear``: a drop-in ``nn.Linear`` whose weight is 2:4 sparse.

Two modes:

``static``  the mask is fixed at construction (magnitude 2:4 pruning of the
            initial or converted weight). The parameter ``values`` (out, in/2)
            holds only the kept weights, so the optimizer state is halved too;
            the 2-bit positions are uint8 buffers. Forward, dX and dW are 2:4
            kernels; dX uses Wᵀ's compression when ``transposable``.
``dynamic`` a dense master ``weight`` is re-pruned on every forward by a fused
            prune+compress kernel; forward and dX are 2:4 kernels, the master
            weight gets the dense straight-through gradient (torchao's recipe).
"""
import math

import torch
from torch import nn

from ..formats.semi import SemiStructuredMatrix, compress, decompress
from ..formats.semi_prune import check_2to4_shape, prune_2to4
from ..kernels import semi as semi_kernels
from ..ops.checks import check_layer_input
from ..ops.semi_linear import semi_linear, semi_linear_dynamic
from ..ops.transforms import transformed
from .autocast import autocast_dtype, cast, outside_autocast
from .dense_export import dense_linear
from .parameter import carry_requires_grad, refuse_meta_device

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_MODES = ("static", "dynamic")


class SemiSparseLinear(nn.Module):
    """y = x Wᵀ + b with W 2:4 sparse (two of every four inputs kept per output).

    Args:
        in_features: multiple of 4. out_features: multiple of 4 if ``transposable``.
        bias: learn an additive bias.
        transposable: every 4x4 tile keeps 2 per row and 2 per column, so Wᵀ is
            2:4 as well and dX runs on the sparse path.
        mode: "static" (fixed mask, compressed parameter) or "dynamic" (dense
            master weight re-pruned every step).
        device, dtype: of the parameters.
    """

    def __init__(self, in_features, out_features, bias=True, *, transposable=True, mode="static",
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_2to4_shape((out_features, in_features), transposable)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"SemiSparseLinear supports dtypes {_DTYPES}, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.transposable, self.mode = bool(transposable), mode
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's initialisation
        dense = torch.empty(out_features, in_features, device=device, dtype=dtype).uniform_(-bound, bound)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound)) \
            if bias else None
        self._cached = None  # (structure key, SemiStructuredMatrix) for sparse_weight()
        # Optional SemiStructuredMatrix whose values receive dYᵀX at its kept positions at the
        # next backward (see semi_linear): how DST methods get the dense gradient (static mode).
        self.grad_probe = None
        if mode == "dynamic":
            self.weight = nn.Parameter(dense)
        else:
            refuse_meta_device("SemiSparseLinear (static mode)", device)
            self.values = nn.Parameter(torch.empty(out_features, in_features // 2, device=device, dtype=dtype))
            self.register_buffer("indices", torch.empty(0, dtype=torch.uint8, device=device))
            self.register_buffer("indices_t", torch.empty(0, dtype=torch.uint8, device=device)
                                 if transposable else None)
            self._set_static(dense, prune_2to4(dense, transposable=transposable))

    @classmethod
    def from_dense(cls, linear, *, transposable=True, mode="static"):
        """Convert an ``nn.Linear``: its weight pruned to 2:4 by magnitude (kept values copied exactly)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, transposable=transposable,
                    mode=mode, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if mode == "dynamic":
                layer.weight.copy_(weight)
            else:
                layer._set_static(weight, prune_2to4(weight, transposable=transposable))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return carry_requires_grad(linear, layer)

    def _set_static(self, dense, mask):
        values, indices = compress(dense, mask)
        self.values.data = values.contiguous()
        self.indices = indices
        if self.transposable:
            self.indices_t = compress(dense.T, mask.T)[1]

    def set_mask(self, mask):
        """Change the 2:4 structure of a static layer (dynamic sparse training does this).

        mask: bool (out_features, in_features) with exactly two True in every group
        of four along a row (and two per column of every 4x4 tile if ``transposable``).
        Weights kept before and after keep their values; newly kept ones start at
        zero. ``values`` keeps its identity and its shape (out, in/2), its slots are
        refilled in the new order, and its ``.grad`` is cleared.

        Returns int64 (out, in/2): for every slot of the new ``values``, the flat slot
        that held the same weight before, or -1 for a new weight. Optimizer state
        shaped like ``values`` must be moved with it (``sparsekern.methods`` does).
        """
        if self.mode != "static":
            raise RuntimeError("set_mask() is for mode='static'; a dynamic layer re-prunes every call")
        shape = (self.out_features, self.in_features)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            raise ValueError(f"mask must be a bool tensor of shape {shape}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        mask = mask.to(self.values.device)
        slots, indices, indices_t = semi_kernels.restructure(mask, self.indices, self.transposable)
        with torch.no_grad():
            self.values.data = carry(self.values.detach(), slots).contiguous()
        # A graph recorded before the change must not put its gradient on the new slots.
        torch.autograd.graph.increment_version(self.values)
        self.indices = indices
        if self.transposable:
            self.indices_t = indices_t
        self.values.grad = None
        self._cached = None
        return slots

    def restructure(self, mask):
        """The structure protocol of the sparse layers (:mod:`sparsekern.methods.dst.state`):
        :meth:`set_mask`, returning its slot map."""
        return self.set_mask(mask)

    @staticmethod
    def carry(tensor, slots):
        """``tensor`` shaped like the old ``values`` moved by the slot map (zero for new weights)."""
        return carry(tensor, slots)

    @property
    def mask(self):
        """Bool (out_features, in_features): the weights in use (recomputed from ``weight`` if dynamic)."""
        if self.mode == "dynamic":
            return prune_2to4(self.weight.detach(), transposable=self.transposable)
        ones = torch.ones(self.values.shape, dtype=torch.bool, device=self.values.device)
        return semi_kernels.decompress_sum([ones], [self.indices], self.in_features)

    def dense_weight(self):
        """The effective dense (out_features, in_features) weight (differentiable where autograd records)."""
        if self.mode == "dynamic":
            return self.weight * self.mask
        if torch.is_grad_enabled() and self.values.requires_grad:
            return decompress(self.values, self.indices, self.in_features)
        # The DST drivers read every layer's dense weight at each update: one kernel pass.
        return semi_kernels.decompress_sum([self.values], [self.indices], self.in_features)

    def to_dense(self):
        """The ``nn.Linear`` this layer stands for (effective weight and bias, same device and dtype),
        e.g. to load a sparse-trained model where a dense checkpoint is expected."""
        return dense_linear(self)

    def sparse_weight(self):
        """The weight as a SemiStructuredMatrix sharing ``values`` (static mode).

        Cached per structure (the optimizer updates ``values`` in place), so Wᵀ's
        gather map is built once per mask, not per step.
        """
        if self.mode == "dynamic":
            raise RuntimeError("sparse_weight() is for mode='static'; a dynamic layer re-prunes every call")
        if torch.compiler.is_compiling() or transformed():
            # Dynamo cannot trace the data_ptr cache key, nor has a torch.func transform's wrapped
            # values a data_ptr: a compiled graph or a transformed call rebuilds Wᵀ's map per call.
            return self._build_sparse_weight()
        key = [id(self.values), self.values.data_ptr(), self.indices.data_ptr(), self.indices._version]
        if self.transposable:
            key += [self.indices_t.data_ptr(), self.indices_t._version]
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._build_sparse_weight())
        return self._cached[1]

    def _build_sparse_weight(self):
        return SemiStructuredMatrix(self.values, self.indices, (self.out_features, self.in_features),
                                    indices_t=self.indices_t if self.transposable else None)

    def forward(self, x):
        check_layer_input(x, self.in_features)
        dtype = autocast_dtype(x, (self.weight if self.mode == "dynamic" else self.values).dtype)
        if dtype is None:
            return self._product(x, self.bias, None)
        with outside_autocast(x):
            return self._product(cast(x, dtype), cast(self.bias, dtype), dtype)

    def _product(self, x, bias, dtype):
        if self.mode == "dynamic":
            return semi_linear_dynamic(x, cast(self.weight, dtype), bias, transposable=self.transposable)
        weight, probe = self.sparse_weight(), self.grad_probe
        if dtype is not None:
            weight = weight.with_values(cast(weight.values, dtype))
            probe = None if probe is None else probe.with_values(cast(probe.values, dtype))
        return semi_linear(x, weight, bias, grad_probe=probe)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The kernels trust indices and indices_t to describe one structure: refuse a pair that
        # does not (e.g. taken from two layers) before anything is copied in.
        indices, indices_t = state_dict.get(prefix + "indices"), state_dict.get(prefix + "indices_t")
        if self.mode == "static" and indices is not None and (indices_t is not None or not self.transposable):
            try:
                SemiStructuredMatrix(self.values.detach(), indices.to(self.values.device),
                                     (self.out_features, self.in_features),
                                     indices_t=indices_t.to(self.values.device) if self.transposable else None)
            except ValueError as exc:
                error_msgs.append(f"bad 2:4 structure for {prefix}indices: {exc}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"transposable={self.transposable}, mode={self.mode!r}")



def carry(tensor, slots):
    """``tensor`` (rows, cols/2) moved by the slot map ``SemiSparseLinear.set_mask`` returns:
    new weights' entries are zero. The layer's values move this way, and so must optimizer
    state shaped like them (``sparsekern.methods`` does)."""
    return semi_kernels.carry(tensor, slots)
