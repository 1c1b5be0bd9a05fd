"""use_backend works as a context manager (the block only) and as a plain call (from then on)."""
import pytest
import torch

import sparsekern as sk
from sparsekern.kernels import forced_backend, select_kernel


def test_plain_call_holds_until_reset_and_the_block_form_restores():
    assert forced_backend() is None
    try:
        sk.use_backend("reference")
        assert select_kernel("bsr_forward", torch.device("cpu"), torch.float32)[0] == "reference"
        with sk.use_backend("cpu"):
            assert forced_backend() == "cpu"
        assert forced_backend() == "reference"
    finally:
        sk.use_backend(None)
    assert forced_backend() is None


def test_an_unknown_backend_is_refused_in_both_forms():
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        sk.use_backend("nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        with sk.use_backend("gpu"):
            pass
    assert forced_backend() is None
