"""``conv_grads`` of a backend whose dX and dW are separate products (the floor rule times them
as one product against the composite's single dense backward)."""


def paired_grads(grad_input, grad_weight):
    """conv_grads(dy, x, values, layout, geometry, bias_grad) -> (dx, dvalues, dbias or None) from
    the two products (dW's gives the bias gradient)."""
    def conv_grads(dy, x, values, layout, geometry, bias_grad=False):
        dx = grad_input(dy, values, layout, geometry, tuple(x.shape[2:]))
        return (dx, *grad_weight(dy, x, layout, geometry, bias_grad))
    return conv_grads
