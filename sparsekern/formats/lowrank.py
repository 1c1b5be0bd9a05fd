"""Low-rank format W = U S Vᵀ: the rank kept by truncation of singular values."""
import torch


def truncation_rank(singular_values, tol, *, absolute=False):
    """Smallest r with ‖σ[r:]‖₂ <= tol·‖σ‖₂ (or <= tol if ``absolute``), σ sorted descending.

    This is DLRT's truncation rule: the dropped tail is at most a fraction
    ``tol`` of the matrix's Frobenius norm. Returns at least 1 for a nonzero σ.
    """
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    s = singular_values.detach().double()
    tails = torch.cat([s.flip(0).pow(2).cumsum(0).flip(0), s.new_zeros(1)]).sqrt()  # tails[r] = ‖σ[r:]‖
    bound = tol if absolute else tol * float(tails[0])
    return int((tails > bound).sum())
