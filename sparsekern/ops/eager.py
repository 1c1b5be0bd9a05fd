"""The ops as torch.library custom ops, and their bodies called directly in plain eager calls.

A custom op is what torch.compile, export and fake tensors need: a schema, a fake
implementation, a graph node. In an eager call it costs the dispatcher, the argument
checks and the pytree walks of its autograd wrapper: ~0.1 ms per op (128 -> 128 3x3 conv
at 16x16, batch 64, density 0.1: a layer step's time over its bare kernels fell from
1.0-1.5 ms to ~0.8 ms, a tiny step's from 854 to 588 us, without them).
So an eager call of plain tensors, with no dispatch mode active, runs the op's Python body
itself, under an autograd.Function built from the same setup_context and backward as the
op's registered autograd; anything else (compiling, fake or other tensor subclasses, a
TorchDispatchMode) goes through the custom op. Both run the same code, so they give the
same result.

Under torch.func's transforms (grad, vjp, jacrev, vmap, jvp, jacfwd, hessian and their
compositions) a call goes through the custom op under a second autograd.Function of the same
backward and jvp with a separate setup_context (what functorch needs; torch.library's own
autograd lacks one), and every custom op has a batching rule (``batching.py``). Forward mode
(functorch's or torch.autograd.forward_ad's) runs an op's jvp rule (``forward_mode.py``);
an op without one refuses it by name.
"""
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batching import register_batching_rule
from .first_order import first_order
from .forward_mode import save_inputs, saved_inputs
from .transforms import dual_level_active, forward_mode, refuse_forward_mode, transformed


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(args):
    for arg in args:
        if isinstance(arg, list):
            if not _plain(arg):
                return False
        elif isinstance(arg, torch.Tensor) and type(arg) not in _PLAIN:
            return False
    return True


def direct(args):
    """Whether a call with ``args`` may run an op's body directly (see the module docstring)."""
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None and _plain(args)


class EagerOp:
    """``torch.library.custom_op(name, fn)``, called through ``self(*args)``: ``fn`` itself
    (under an autograd.Function where ``backward`` is given and a gradient is wanted) in plain
    eager calls, else the custom op. ``self.op`` is the custom op (fakes, opcheck)."""

    def __init__(self, name, fn, per_row):
        self.name = name
        self.op = torch.library.custom_op(name, fn, mutates_args=())
        self.fn = fn
        self.function = self.transformable = None
        self.per_row = per_row
        register_batching_rule(self.op, per_row)

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_batching(self, special):
        """An op's own vmap rule for some cases (``batching.register_batching_rule``); decorator."""
        register_batching_rule(self.op, self.per_row, special)
        return special

    def register_autograd(self, backward, setup_context, *, differentiable=False, jvp=None):
        """``differentiable``: ``backward`` is written in ops that have autograd themselves, so a
        second backward may run through it; otherwise it is refused (``first_order``).
        ``jvp(args, tangents)``: the outputs' tangents (forward_mode.py); without it, forward mode
        is refused by name."""
        if not differentiable:
            backward = first_order(self.name)(backward)
        torch.library.register_autograd(self.op, backward, setup_context=setup_context)
        fn, name = self.fn, self.name

        def backward_per_input(ctx, *grads):
            # A custom op's backward returns a list of Nones for a list input; a Function, one None.
            return tuple(None if isinstance(g, list) else g for g in backward(ctx, *grads))

        def setup(ctx, args, output):
            setup_context(ctx, args, output)
            if jvp is not None and (dual_level_active() or forward_mode()):  # only forward mode reads them
                save_inputs(ctx, args)

        def forward(ctx, *args):
            # setup_context inside forward: a Function with a separate setup_context binds its
            # arguments through inspect.signature on every call (~30 us).
            output = fn(*args)
            setup(ctx, args, output)
            return output

        def forward_derivative(ctx, *tangents):
            if jvp is None:
                refuse_forward_mode(name, active=True)
            return jvp(saved_inputs(ctx), tangents)

        self.function = type(f"{fn.__name__}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward_per_input),
            "jvp": staticmethod(forward_derivative)})
        self.transformable = _transformable(self.op, setup, backward_per_input, forward_derivative)

    def __call__(self, *args):
        if transformed():
            return self._transformed(args)
        if not direct(args):
            return self.op(*args)
        _refuse_tracing(self.name)
        if self.function is not None and (_needs_grad(args) or dual_level_active()):
            return self.function.apply(*args)
        return self.fn(*args)

    def _transformed(self, args):
        """A call under torch.func transforms (see the module docstring)."""
        if self.transformable is not None and (_needs_grad(args) or forward_mode()):
            return self.transformable.apply(*_flat_call(args))
        refuse_forward_mode(self.name)
        return self.op(*args)


def _transformable(op, setup, backward, jvp):
    """The Function functorch runs: forward and setup_context apart (functorch calls setup_context
    itself and vmaps all three, generate_vmap_rule, on top of the ops' batching rules), and every
    argument a leaf: functorch matches a jvp's tangents to the inputs as a flat list, so a list of
    layout tensors is passed as its elements, with the nesting as the first argument."""

    def forward(nesting, *leaves):
        return op(*tree_unflatten(leaves, nesting))

    def setup_context(ctx, inputs, output):
        nesting, *leaves = inputs
        args = tree_unflatten(leaves, nesting)
        # None: the argument is a leaf itself; else how many leaves its list holds
        ctx.leaf_counts = [None if spec.is_leaf() else len(flat) for flat, spec in map(tree_flatten, args)]
        setup(ctx, args, output)

    def per_leaf(ctx, per_argument):
        # a list argument's gradient or tangent is one None: one per element here
        return (None, *(leaf for value, count in zip(per_argument, ctx.leaf_counts)
                        for leaf in ([value] if count is None else [None] * count)))

    def per_argument(ctx, per_leaf_values, empty=None):
        values, out = list(per_leaf_values), []
        for count in ctx.leaf_counts:
            out.append(values.pop(0) if count is None else empty)
            del values[:count or 0]
        return out

    def backward_per_leaf(ctx, *grads):
        # the backward reads needs_input_grad per argument, as the op's registered autograd gives it
        ctx.needs_input_grad = tuple(per_argument(ctx, ctx.needs_input_grad[1:], False))
        return per_leaf(ctx, backward(ctx, *grads))

    return type(f"{op._name}_transformable", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_per_leaf),
        "jvp": staticmethod(lambda ctx, _nesting, *tangents: jvp(ctx, *per_argument(ctx, tangents))),
        "generate_vmap_rule": True})


def _flat_call(args):
    leaves, nesting = tree_flatten(list(args))
    return (nesting, *leaves)


def _needs_grad(args):
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _refuse_tracing(name):
    """A clear error where TorchScript tracing would bake the shapes of this call into the trace."""
    if torch.jit.is_tracing():
        raise RuntimeError(f"{name} cannot be traced by torch.jit.trace (TorchScript); use torch.export.export "
                           "or torch.compile, which support sparsekern's ops")


def eager_op(name, *, per_row=False):
    """Decorator: ``fn`` as an EagerOp named ``name`` (no argument is mutated). ``per_row``: each
    output row depends only on the same row of the first argument (batching.py folds vmap's
    dimension into the rows)."""
    return lambda fn: EagerOp(name, fn, per_row)
