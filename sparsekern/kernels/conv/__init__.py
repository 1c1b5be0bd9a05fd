"""Block-sparse Conv2d products (geometry and block structure: ``geometry.py``). Every backend
implements the same three:

``conv_forward(x, values, layout, geometry, bias=None) -> y``
    x (N, C, H, W), W = (values, layout) of shape (O, C / groups, kh, kw):
    y = F.conv2d(x, W, bias, stride, padding, dilation, groups), (N, O, Ho, Wo).
``conv_grad_input(dy, values, layout, geometry, input_size) -> dx``
    dy (N, O, Ho, Wo): the gradient of the forward with respect to x, (N, C, H, W) with
    (H, W) = ``input_size``. Walks W by block columns (transpose metadata).
``conv_grad_weight(dy, x, layout, geometry, bias_grad=False) -> (dvalues, dbias or None)``
    The weight gradient on the blocks of ``layout`` only, (nnz, bs, bs, kh, kw), and the bias
    gradient (the sum of dy over batch and pixels, (O,)) if asked.
``conv_grads(dy, x, values, layout, geometry, bias_grad=False) -> (dx, dvalues, dbias or None)``
    Both gradients of one backward, and the bias gradient if asked (the reference backend:
    one dense convolution backward, the bias gradient inside it as in nn.Conv2d's).

Inputs arrive on one device, of one floating dtype (checked by the op layer), in either
memory format; ``values`` is contiguous. Outputs are new tensors of the input dtype, in the
memory format F.conv2d gives for that input (``output_memory_format``); half types
accumulate in fp32. N and nnz may be 0. An automatic choice of the cpu or triton backend runs under the
measured floor rule (never slower than dense F.conv2d); ``policy.py`` gives it the conv's
shape classes and the calls it need not measure.
"""
from . import reference  # noqa: F401  (registers the reference backend)
from . import cpu  # noqa: F401  (registers the C++ cpu backend; loads it on first use)
from . import triton_backend  # noqa: F401  (registers the triton backend; triton loads on first use)
from . import policy  # noqa: F401  (registers the products with the floor rule)
from .blocks import block_norms, dense_conv_weight, gather_blocks
from .geometry import ConvGeometry, output_memory_format

__all__ = ["ConvGeometry", "block_norms", "dense_conv_weight", "gather_blocks", "output_memory_format"]
