"""Dynamic sparse training drivers acting on :class:`sparsekern.SparseLinear` layers
(block or element granularity), :class:`sparsekern.SparseConv2d` layers (blocks of
output x input channels with all their taps) and static
:class:`sparsekern.SemiSparseLinear` layers (2:4; SET, RigL, SNFS and GGR).

Usage (the same for every driver)::

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = RigL(model, opt, density=0.1, delta=100, alpha=0.3, t_end=int(0.75 * steps))
    for x, y in data:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        if dst.step() and ddp is not None:      # True when the structure changed
            ddp = DistributedDataParallel(model)  # parameter shapes changed: re-wrap

Granularity is the layer's: a block of (br, bc) is the unit that is dropped or
grown (block size 1 gives element granularity: correct, not fast). Block
scores are RMS values over the block (so blocks of different sizes compare).
Static :class:`sparsekern.SemiSparseLinear` layers are handled at 2:4
granularity (drop and regrow inside each group of four, or 4x4 tile if
transposable: :func:`~sparsekern.methods.functional.semi_drop_and_grow`; the
probe is in :mod:`sparsekern.methods.dst.semi_probe`).

Scores without a dense weight update: on the step *before* an update step
the driver installs a :class:`~sparsekern.methods.dst.scores.ScoreProbe` on
each layer. It gets the block RMS of the dense gradient dYᵀX either from the
sampled-dW product on every block (``grad_probe``; ``values`` takes its own
blocks' gradient from that product, not computed twice) or, where cheaper,
from Gram matrices of X and dY without forming dYᵀX (``score_method``; see
:mod:`sparsekern.methods.dst.scores`). A SparseConv2d layer's probe runs the conv
weight-gradient product on every block (all taps) inside its backward. The probe is
removed afterwards.

Structure changes go through :func:`~sparsekern.methods.dst.state.restructure`
(the layers' structure protocol): the ``values`` Parameter keeps its identity,
and every optimizer state tensor shaped like the values is carried with its
weights; regrown weights start at zero with zero state.

Multi-process (docs/distributed.md): every rank must take the same decision. Probe
gradients are not DDP parameters, so the driver all-reduces (averages) its scores
itself; weights and optimizer state are already identical on every rank; random
choices come from the driver's own generator seeded identically (``seed``). Ties are
broken by index, never by noise. After a structure change ``step()`` returns True:
parameter shapes changed, so a DDP wrapper must be rebuilt (``init_sync=False``: the
ranks already agree). Under FSDP2, call :func:`sparsekern.methods.distributed.structure_step`
instead of ``step()``.
"""
import math
import time
import warnings

import torch
import torch.distributed as dist

from ...formats.bsr import BlockLayout
from ...nn.parameter import replace_data_
from ...nn.bsr_linear import SparseLinear
from ...nn.conv2d import SparseConv2d
from ...nn.semi_linear import SemiSparseLinear
from ..pruning.density import erk_densities
from .rules import ggr_new_masks, rigl_new_mask, set_new_mask, snfs_new_masks
from .schedules import DropSchedule
from .scores import SCORE_METHODS, ScoreProbe, block_rms, install_probe, probe_grad, remove_probe
from .semi_probe import SemiProbe
from .semi_rules import semi_rigl_update, semi_set_update
from .state import gather_blocks, new_state, restructure, restructure_from


def on_grid(layout, scores):
    """Per-block scores (nnz,) placed on the block grid, zero elsewhere."""
    grid = scores.new_zeros(layout.grid)
    grid[layout.row_indices, layout.col_indices] = scores
    return grid


def weight_shape(layer):
    """The dense weight shape a block layer stands for: (out, in), or (out, in / groups, kh, kw)."""
    if isinstance(layer, SparseConv2d):
        return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    return (layer.out_features, layer.in_features)


def all_reduce_mean(tensor, group=None):
    """Average ``tensor`` over the ranks (in place) when a process group is running."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
        tensor /= dist.get_world_size(group)
    return tensor



def _check_optimizer_holds(optimizer, layers, driver):
    """The optimizer must step the layers' stored values. One made before ``sparsify`` holds the
    replaced dense weights instead and would train nothing the driver restructures: refused. Some
    layers left out (trained by nothing): a warning naming them."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, layer in layers if id(layer.values) not in held]
    if missing and len(missing) == len(layers):
        raise ValueError(f"{driver}: the optimizer holds none of the sparse layers' values ({missing}); was it "
                         "created before sparsify replaced the dense layers? Create it from model.parameters() "
                         "after sparsify")
    if missing:
        warnings.warn(f"{driver}: the optimizer does not hold the values of {missing}: their structure will change "
                      "but nothing trains them", UserWarning, stacklevel=3)


class DynamicSparsity:
    """Base driver: finds the block layers, owns the schedule and the generator.

    Args:
        model: module holding SparseLinear, SparseConv2d and/or static SemiSparseLinear
            layers (not a DDP wrapper: pass ``ddp.module``). Frozen layers (``values`` not
            requiring grad) are left as they are, structure included.
        optimizer: the optimizer stepping the model's parameters.
        density: global weight density of the SparseLinear and SparseConv2d layers; they get
            ERK densities (kernel dims counted; rounded to whole blocks). A layer that already
            stores that many blocks keeps its structure and values (e.g. a model converted by
            ``sparsify``); the others get a
            random mask from ``seed``, surviving blocks keeping their values and new ones drawn
            at the scale of the layer's values. Biases are never touched. None keeps every
            current mask. SemiSparseLinear layers keep their 2:4 mask (density 1/2) either way.
        redraw: draw fresh random masks for every layer and re-initialise their values with
            nn.Linear's rule (training from scratch, as in the papers), even where they fit.
        delta, alpha, t_end: update every ``delta`` steps while step < ``t_end``,
            dropping ``alpha`` (cosine-annealed, or constant with ``schedule="constant"``).
        seed: seeds the masks and all random choices (identical on every rank).
        process_group: for the score all-reduce (default: the world).
        score_method: how RigL/SNFS/GGR get dense-gradient block scores on SparseLinear
            layers: "product" (sampled dW on every block), "gram" (the same norms from
            Gram matrices, never forming dW) or "auto" (gram where it is at most half
            the work); see :mod:`sparsekern.methods.dst.scores`. SparseConv2d layers
            always run the conv weight-gradient product.
    """
    needs_scores = False

    def __init__(self, model, optimizer, *, density, delta=100, alpha=0.3, t_end, schedule="cosine",
                 seed=0, process_group=None, score_method="auto", redraw=False):
        if score_method not in SCORE_METHODS:
            raise ValueError(f"score_method must be one of {SCORE_METHODS}, got {score_method!r}")
        self.model, self.optimizer = model, optimizer
        self.score_method, self.redraw = score_method, bool(redraw)
        # A frozen layer (values not requiring grad) keeps its structure: no gradient reaches it to score.
        self.layers = [(n, m) for n, m in model.named_modules()
                       if isinstance(m, (SparseLinear, SparseConv2d)) and m.values.requires_grad]
        self.semi_layers = [(n, m) for n, m in model.named_modules()
                            if isinstance(m, SemiSparseLinear) and (m.mode != "static" or m.values.requires_grad)]
        for name, layer in self.semi_layers:
            if layer.mode != "static":
                raise ValueError(f"SemiSparseLinear {name!r} has mode={layer.mode!r}: it re-prunes every step; "
                                 "dynamic sparse training needs mode='static'")
        if not self.layers and not self.semi_layers:
            raise ValueError(f"{type(model).__name__} holds no sparsekern.SparseLinear, SparseConv2d or "
                             "SemiSparseLinear layer to train (frozen ones, values.requires_grad False, keep their "
                             "structure)")
        _check_optimizer_holds(optimizer, self.layers + self.semi_layers, type(self).__name__)
        self.schedule = DropSchedule(delta=delta, alpha=alpha, t_end=t_end, kind=schedule)
        self.generator = torch.Generator().manual_seed(seed)
        self.group = process_group
        self.t = 0
        self.update_seconds = []
        self._probes, self._semi_probes = {}, {}
        if density is not None and self.layers:
            self._init_masks(density)
        # What SNFS and GGR hold constant while moving blocks between layers: stored weights,
        # not blocks (a conv block holds kh x kw times a linear block's weights).
        self.target_weights = sum(layer.values.numel() for _, layer in self.layers)
        self._setup()
        self._arm()

    def _setup(self):
        """Hook for drivers with extra state built from the initial structure."""

    def _init_masks(self, density):
        shapes = [weight_shape(layer) for _, layer in self.layers]
        for (_, layer), d in zip(self.layers, erk_densities(shapes, density)):
            cells = layer.block_mask.numel()
            target = int(round(d * cells))
            if layer.nnz_blocks == target and not self.redraw:
                continue  # the model's own structure and values already fit: adopt them
            keep = torch.randperm(cells, generator=self.generator)[:target]
            mask = torch.zeros(cells, dtype=torch.bool)
            mask[keep] = True
            self._init_layer(layer, mask.view(layer.block_mask.shape))

    def _init_layer(self, layer, mask):
        """Give ``layer`` the initial structure ``mask``. Surviving blocks keep their values and new
        blocks are drawn at the scale of the layer's current values (its own initialisation, e.g. a
        std-0.02 transformer init), unless ``redraw`` asks for nn.Linear's; biases are never touched."""
        real = layer.dense_weight().detach()
        std = float(real.float().std()) if real.numel() > 1 and layer.nnz_blocks else 0.0
        bound = None if self.redraw or not std > 0 else std * 3 ** 0.5  # U(±b) has std b/sqrt(3)
        slots = layer.restructure(mask.to(layer.block_mask.device))
        layer.reset_values(bound, blocks=None if self.redraw else (slots < 0).nonzero().squeeze(1))
        self.optimizer.state.pop(layer.values, None)

    # -- the step ------------------------------------------------------------
    def step(self):
        """Call right after ``optimizer.step()``; returns True if the structure changed."""
        self.t += 1
        self._after_optimizer_step()
        changed = self.schedule.is_update_step(self.t)
        if changed:
            start = time.perf_counter()
            counts = self._block_counts()
            with torch.no_grad():
                self._update(self.schedule.drop_fraction(self.t))
            if self._block_counts() != counts:
                # Every layer's count becomes a symbol at the first change anywhere: a compiled
                # model then recompiles once, not again for each layer whose count changes later.
                for _, layer in self.layers:
                    layer.mark_block_count_dynamic()
            self.update_seconds.append(time.perf_counter() - start)
        self._arm()
        return changed

    def _block_counts(self):
        return [layer.nnz_blocks for _, layer in self.layers]

    def _cell_sizes(self):
        """Weights per block of each layer (all taps of a conv block)."""
        return [math.prod(layer.values.shape[1:]) for _, layer in self.layers]

    def _after_optimizer_step(self):
        """Per-step work of drivers with shadow weights (Top-KAST, DPF)."""

    def _update(self, drop_fraction):
        raise NotImplementedError

    def _arm(self):
        """Install dense probes iff the next step is an update step that needs scores."""
        for probe in [*self._probes.values(), *self._semi_probes.values()]:
            probe.remove()
        self._probes, self._semi_probes = {}, {}
        if self.needs_scores and self.schedule.is_update_step(self.t + 1):
            self._probes = {name: ScoreProbe(layer, self.score_method) for name, layer in self.layers}
            self._semi_probes = {name: SemiProbe(layer) for name, layer in self.semi_layers}

    # -- scores --------------------------------------------------------------
    def _weight_scores(self, layer):
        return on_grid(layer.layout(), block_rms(layer.values))

    def _grad_scores(self):
        """Dense block-RMS gradient scores on each layer's grid, averaged over ranks."""
        if not self.layers:
            return []
        scores = [self._probes[n].scores(n) for n, _ in self.layers]
        flat = all_reduce_mean(torch.cat([s.reshape(-1) for s in scores]), self.group)
        return [part.view_as(s) for part, s in zip(flat.split([s.numel() for s in scores]), scores)]

    def _semi_grad_scores(self):
        """Dense gradients (rows, cols) of the SemiSparseLinear layers, averaged over ranks."""
        if not self.semi_layers:
            return []
        grads = [self._semi_probes[n].dense_grad(n) for n, _ in self.semi_layers]
        flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]), self.group)
        return list(flat.split([g.numel() for g in grads]))

    def _update_semi(self, drop_fraction, random_growth=False):
        """2:4 layers: drop the smallest |w|, regrow inside their groups (by gradient, or at random)."""
        grads = [None] * len(self.semi_layers) if random_growth else self._semi_grad_scores()
        for (_, layer), grad in zip(self.semi_layers, grads):
            weight = layer.dense_weight().detach()
            if random_growth:
                mask, _ = semi_set_update(weight, layer.mask, drop_fraction, generator=self.generator,
                                          transposable=layer.transposable)
            else:
                mask, _ = semi_rigl_update(weight, layer.mask, grad.view_as(weight), drop_fraction,
                                           transposable=layer.transposable)
            restructure(layer, self.optimizer, mask)

    # -- checkpoints ---------------------------------------------------------
    def state_dict(self):
        return {"t": self.t, "generator": self.generator.get_state(), "update_seconds": list(self.update_seconds),
                "target_weights": self.target_weights}

    def load_state_dict(self, state):
        """Restore the driver; load the model (its structure) and optimizer states too."""
        self.t = int(state["t"])
        self.generator.set_state(state["generator"])
        self.target_weights = int(state.get("target_weights", self.target_weights))
        self.update_seconds = list(state.get("update_seconds", []))
        self._arm()

    def densities(self):
        return {**{n: layer.density for n, layer in self.layers}, **{n: 0.5 for n, _ in self.semi_layers}}


class SET(DynamicSparsity):
    """Drop the smallest blocks, regrow as many at random (no gradient needed)."""

    def _update(self, drop_fraction):
        for _, layer in self.layers:
            mask = set_new_mask(self._weight_scores(layer), layer.block_mask, drop_fraction, self.generator)
            restructure(layer, self.optimizer, mask)
        self._update_semi(drop_fraction, random_growth=True)


class RigL(DynamicSparsity):
    """Drop the smallest blocks, grow those of largest dense-gradient score (new blocks zero)."""
    needs_scores = True

    def _update(self, drop_fraction):
        for (_, layer), grad in zip(self.layers, self._grad_scores()):
            mask = rigl_new_mask(self._weight_scores(layer), layer.block_mask, grad, drop_fraction)
            restructure(layer, self.optimizer, mask)
        self._update_semi(drop_fraction)


class SNFS(DynamicSparsity):
    """Sparse momentum: layer shares by mean |momentum| of active blocks, growth by dense
    gradient score (the instantaneous gradient stands in for the dense momentum, which a
    sparse run does not keep)."""
    needs_scores = True

    def _momentum_scores(self, layer):
        state = self.optimizer.state.get(layer.values, {})
        momentum = state.get("momentum_buffer", state.get("exp_avg"))
        if momentum is None or tuple(momentum.shape) != tuple(layer.values.shape):
            momentum = layer.values.grad if layer.values.grad is not None else torch.zeros_like(layer.values)
        return on_grid(layer.layout(), block_rms(momentum))

    def _update(self, drop_fraction):
        grads = self._grad_scores()
        new_masks = snfs_new_masks([self._weight_scores(l) for _, l in self.layers],
                                   [l.block_mask for _, l in self.layers],
                                   [self._momentum_scores(l) for _, l in self.layers], drop_fraction,
                                   grow_scores=grads, cell_sizes=self._cell_sizes(), target=self.target_weights)
        for (_, layer), mask in zip(self.layers, new_masks):
            restructure(layer, self.optimizer, mask)
        self._update_semi(drop_fraction)  # 2:4 fixes each layer's density: nothing to redistribute


class GGR(DynamicSparsity):
    """Global gradient-based redistribution: drop per layer by magnitude, regrow the
    dropped total where the dense block-RMS gradient is largest over all layers."""
    needs_scores = True

    def _update(self, drop_fraction):
        if self.layers:
            new_masks = ggr_new_masks([self._weight_scores(l) for _, l in self.layers],
                                      [l.block_mask for _, l in self.layers], self._grad_scores(), drop_fraction,
                                      cell_sizes=self._cell_sizes(), target=self.target_weights)
            for (_, layer), mask in zip(self.layers, new_masks):
                restructure(layer, self.optimizer, mask)
        self._update_semi(drop_fraction)  # 2:4 fixes each layer's density: nothing to redistribute


class ShadowDriver(DynamicSparsity):
    """Base of drivers that train blocks outside the forward set (Top-KAST, DPF).

    The layer's ``values`` hold the forward set F; the driver holds the *shadow*
    blocks S (disjoint from F) of each layer as a Parameter of its own, trained
    by ``shadow_optimizer``, a clone of the user's optimizer (same class,
    hyperparameters copied from the user's param group before each step, so LR
    schedules apply). A probe on F ∪ S is installed at every step: its gradient
    feeds S, and F's own gradient is taken from it (not computed twice).
    """
    def _setup(self):
        if self.semi_layers:
            raise ValueError(f"{type(self).__name__} is not implemented at 2:4 granularity (SemiSparseLinear "
                             f"{self.semi_layers[0][0]!r}); use SET, RigL, SNFS or GGR")
        self.shadow = {}
        for name, layer in self.layers:
            mask = self._initial_shadow_mask(layer)
            layout = BlockLayout.from_block_mask(mask, layer.padded_shape, layer.block_size)
            param = torch.nn.Parameter(layer.values.new_zeros(layout.nnz_blocks, *layer.values.shape[1:]))
            self.shadow[name] = (param, layout)
        self.shadow_optimizer = type(self.optimizer)([p for p, _ in self.shadow.values()],
                                                     **self.optimizer.defaults)

    def _initial_shadow_mask(self, layer):
        raise NotImplementedError

    def _arm(self):
        for _, layer in self.layers:
            remove_probe(layer)
        self._probes = {name: install_probe(layer, layer.block_mask | self.shadow[name][1].block_mask)
                        for name, layer in self.layers}

    def _shadow_penalty(self, name, param):
        return None

    def _after_optimizer_step(self):
        grads = []
        for name, _ in self.layers:
            probe, (param, layout) = self._probes[name], self.shadow[name]
            grads.append(probe_grad(probe, name)[probe.layout.positions_of(layout)])
        flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]), self.group)
        start = 0
        for (name, _), g in zip(self.layers, grads):
            param = self.shadow[name][0]
            grad = flat[start:start + g.numel()].view_as(g)
            start += g.numel()
            penalty = self._shadow_penalty(name, param)
            param.grad = grad if penalty is None else grad + penalty
        self._sync_hyperparameters()
        self.shadow_optimizer.step()
        self.shadow_optimizer.zero_grad(set_to_none=True)

    def _sync_hyperparameters(self):
        values = {id(layer.values) for _, layer in self.layers}
        group = next((g for g in self.optimizer.param_groups if any(id(p) in values for p in g["params"])),
                     self.optimizer.param_groups[0])
        for shadow_group in self.shadow_optimizer.param_groups:
            shadow_group.update({k: v for k, v in group.items() if k != "params"})

    def _all_values(self, name, layer):
        """(values, layout) of F ∪ S together, and the sources they came from."""
        param, layout = self.shadow[name]
        sources = [(layer.values.detach(), layer.layout()), (param.detach(), layout)]
        union = BlockLayout.from_block_mask(layer.block_mask | layout.block_mask, layer.padded_shape,
                                            layer.block_size)
        return gather_blocks(sources, union, layer.values.detach()), union, sources

    def _restructure(self, name, layer, forward_mask, shadow_mask, sources):
        """New F and S: values and optimizer state follow their blocks wherever they move."""
        param, layout = self.shadow[name]
        state_sources = [(self.optimizer, layer.values, layer.layout()), (self.shadow_optimizer, param, layout)]
        new_layout = BlockLayout.from_block_mask(shadow_mask, layer.padded_shape, layer.block_size)
        shadow_values = gather_blocks(sources, new_layout, layer.values.detach())
        shadow_state = new_state(state_sources, new_layout)
        restructure_from(layer, self.optimizer, forward_mask, sources, state_sources)
        replace_data_(param, shadow_values)
        self.shadow_optimizer.state[param] = shadow_state
        self.shadow[name] = (param, new_layout)

    def state_dict(self):
        state = super().state_dict()
        state["shadow"] = {n: (layout.block_mask.clone(), p.detach().clone()) for n, (p, layout) in self.shadow.items()}
        state["shadow_optimizer"] = self.shadow_optimizer.state_dict()
        return state

    def load_state_dict(self, state):
        for (name, layer) in self.layers:
            mask, values = state["shadow"][name]
            param = self.shadow[name][0]
            replace_data_(param, values.to(param.device, param.dtype).clone())
            layout = BlockLayout.from_block_mask(mask.to(param.device), layer.padded_shape, layer.block_size)
            self.shadow[name] = (param, layout)
        self.shadow_optimizer.load_state_dict(state["shadow_optimizer"])
        super().load_state_dict(state)
