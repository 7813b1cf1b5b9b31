"""Pruning on plain tensors: importance scores (magnitude, Wanda), keep masks, torch's 2:4 layout.

Entry points:
- `magnitude_scores(w)` = |W|; `wanda_scores(w, act_norm)` = |W[n, j]|·‖X_j‖₂ (Sun et al. 2023),
  given the per-input-channel L2 norm over calibration tokens (or `act_sq_sum=` Σ_t x_tj²).
- `prune_mask(scores, sparsity, pattern)` -> bool keep mask [N, K]:
  - "unstructured": in each output row, the int(K·sparsity) lowest scores are pruned (Wanda's
    per-output comparison group);
  - "N:M" (e.g. "2:4", "4:8"): in each group of M consecutive inputs of a row, the N lowest scores
    are pruned and M - N kept, as in Wanda's `prune_n:prune_m`. For 2:4 and 4:8 this is the same
    as NVIDIA's "2 of 4 kept"; for other N:M note that N counts the zeros. The pattern fixes the
    sparsity N/M; `sparsity` must then be left None or equal N/M.
- `is_2_4_sparse(w)`: at most 2 nonzeros in every 4 consecutive inputs of each row (what torch's
  semi-structured kernels need; lowerings check the weight itself rather than trusting a mark).
- `to_semi_structured(w)`: a 2:4-pruned weight in torch's compressed layout
  (`torch.sparse.to_sparse_semi_structured`) on a CUDA device of compute capability >= 8.0;
  returns None on CPU (and on older GPUs), where torch has no semi-structured kernels.
Ties between equal scores are broken by position (earlier inputs are pruned first), so masks are
deterministic.
"""
import re
from typing import Optional

import torch

_NM = re.compile(r"^(\d+):(\d+)$")


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """w: [N, K] -> |w|: [N, K] fp32."""
    _check_2d(w, "magnitude_scores")
    return w.float().abs()


def wanda_scores(
    w: torch.Tensor,  # [N, K]
    act_norm: Optional[torch.Tensor] = None,  # [K] ‖X_j‖₂ over calibration tokens
    *,
    act_sq_sum: Optional[torch.Tensor] = None,  # [K] Σ_t x_tj² (what a calibrator accumulates)
) -> torch.Tensor:
    """-> |W[n, j]|·‖X_j‖₂: [N, K] fp32. Give exactly one of `act_norm` and `act_sq_sum`."""
    _check_2d(w, "wanda_scores")
    if (act_norm is None) == (act_sq_sum is None):
        raise ValueError("wanda_scores: give exactly one of act_norm ([K] L2 norms) and act_sq_sum ([K] Σ x²)")
    stat = act_norm if act_norm is not None else act_sq_sum
    if stat.shape != (w.shape[1],):
        raise ValueError(f"wanda_scores: activation statistic has shape {tuple(stat.shape)}, expected [K={w.shape[1]}]")
    if not bool(torch.isfinite(stat).all()) or bool((stat < 0).any()):
        raise ValueError("wanda_scores: activation statistic must be finite and >= 0")
    norm = stat.float() if act_norm is not None else stat.float().sqrt()
    return w.float().abs() * norm.to(w.device).unsqueeze(0)


def prune_mask(
    scores: torch.Tensor,  # [N, K] importance, higher = keep
    sparsity: Optional[float] = None,
    pattern: str = "unstructured",
) -> torch.Tensor:
    """-> keep mask: [N, K] bool (False = pruned). `sparsity` defaults to 0.5 when unstructured."""
    _check_2d(scores, "prune_mask")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("prune_mask: scores contain NaN or Inf")
    n_rows, k = scores.shape
    if pattern == "unstructured":
        sparsity = 0.5 if sparsity is None else sparsity
        _check_sparsity(sparsity)
        n_prune = int(k * sparsity)
        order = scores.argsort(dim=1, stable=True)  # [N, K] ascending score
        keep = torch.ones_like(scores, dtype=torch.bool)
        return keep.scatter_(1, order[:, :n_prune], False)
    match = _NM.match(pattern)
    if match is None:
        raise ValueError(f"prune_mask: pattern {pattern!r} is not 'unstructured' or 'N:M' (e.g. '2:4', '4:8')")
    n_zero, m = int(match.group(1)), int(match.group(2))
    if not 0 < n_zero < m:
        raise ValueError(f"prune_mask: pattern {pattern!r} needs 0 < N < M (N zeros in every M inputs)")
    if k % m != 0:
        raise ValueError(f"prune_mask: pattern {pattern!r} needs M={m} to divide K={k}")
    if sparsity is not None and abs(sparsity - n_zero / m) > 1e-9:
        raise ValueError(f"prune_mask: pattern {pattern!r} fixes sparsity {n_zero / m}; got sparsity={sparsity}")
    groups = scores.reshape(n_rows, k // m, m)  # [N, K/M, M]
    order = groups.argsort(dim=2, stable=True)  # [N, K/M, M] ascending score
    keep = torch.ones_like(groups, dtype=torch.bool)
    return keep.scatter_(2, order[..., :n_zero], False).reshape(n_rows, k)


def is_2_4_sparse(w: torch.Tensor) -> bool:
    """w: [N, K] -> True when K is a multiple of 4 and every 4 consecutive inputs of a row hold at most 2 nonzeros."""
    _check_2d(w, "is_2_4_sparse")
    if w.shape[1] % 4 != 0:
        return False
    nonzero_per_group = (w != 0).reshape(w.shape[0], -1, 4).sum(dim=-1)  # [N, K/4]
    return not bool((nonzero_per_group > 2).any())


def to_semi_structured(w: torch.Tensor):
    """w: [N, K] with at least 2 zeros in every 4 consecutive inputs -> torch's compressed 2:4 tensor.

    Returns a `torch.sparse.SparseSemiStructuredTensor` (usable in `F.linear`/`torch.mm`) when w is on
    a CUDA device of compute capability >= 8.0; returns None on CPU or older GPUs. torch itself adds
    shape/dtype limits (fp16/bf16/int8; rows and columns multiples of 32 to 128) and raises if unmet.
    """
    _check_2d(w, "to_semi_structured")
    if w.shape[1] % 4 != 0:
        raise ValueError(f"to_semi_structured: K={w.shape[1]} must be a multiple of 4")
    if not is_2_4_sparse(w):
        raise ValueError("to_semi_structured: w is not 2:4 sparse; apply prune_mask(..., pattern='2:4') first")
    if not w.is_cuda or torch.cuda.get_device_capability(w.device) < (8, 0):
        return None
    return torch.sparse.to_sparse_semi_structured(w)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"prune_mask: sparsity={sparsity} must lie strictly between 0 and 1")


def _check_2d(t: torch.Tensor, who: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{who}: expected a 2-D [N, K] tensor, got shape {tuple(t.shape)}")
