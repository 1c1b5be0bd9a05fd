"""``conv_grads`` of a backend whose dX and dW are separate products (the floor rule times them
as one product against the composite's single dense backward)."""


def paired_grads(grad_input, grad_weight):
    """conv_grads(dy, x, values, layout, geometry) -> (dx, dvalues) from the two products."""
    def conv_grads(dy, x, values, layout, geometry):
        return grad_input(dy, values, layout, geometry, tuple(x.shape[2:])), grad_weight(dy, x, layout, geometry)
    return conv_grads
