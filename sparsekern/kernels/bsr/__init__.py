"""Block-sparse linear products. Every backend implements the same three:

``bsr_forward(x, values, layout, bias=None) -> y``
    x (M, K) dense, W = (values, layout) of shape (N, K): y = x @ W.T (+ bias), (M, N).
``bsr_grad_input(dy, values, layout) -> dx``
    dy (M, N): dx = dy @ W, (M, K). Walks W by block columns (transpose metadata).
``bsr_grad_weight(dy, x, layout, bias_grad=False) -> (dvalues, dbias or None)``
    The sampled product (dy.T @ x) on the blocks of ``layout`` only: (nnz, br, bc); with
    ``bias_grad`` also dy's column sums (N,), the bias gradient, which the cpu kernels sum on
    their pass over dy.

Inputs arrive contiguous, on one device, of one floating dtype (checked by the op
layer). Outputs are new tensors of the input dtype; half types accumulate in fp32.
M, N, K and nnz may be 0.
"""
from . import reference  # noqa: F401  (registers the reference backend)
from . import dense  # noqa: F401  (registers the dense masked-GEMM composite)
from . import cpu  # noqa: F401  (registers the C++ cpu backend; loads it on first use)
from . import triton_backend  # noqa: F401  (registers the triton backend; triton loads on first use)
