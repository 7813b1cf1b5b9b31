"""AWQ (Lin et al. 2023, "Activation-aware Weight Quantization"): the two searches, on plain tensors.

Entry points:
- `search_awq_scales(x, weights, bits, group_size)` -> `AwqScales(scales [K], alpha, duo, errors)`: the
  per-input-channel scale that minimizes the output error of the linears sharing input x when each W
  is quantized as Q(W·s)/s. Two families of candidates, each over alpha in {0, 1/grid, ..., 1}:
  s = mean|x|^alpha (the paper's) and, with `duo=True`, s = mean|x|^alpha / mean|ŵ|^(1 - alpha)
  (AutoAWQ's "duo scaling", ŵ = |W| over its group's max |W|: channels whose weights are small in
  their groups lose little when scaled up). Every candidate is normalized by sqrt(max s · min s), as
  AutoAWQ does. alpha = 0 of the first family gives s = 1, i.e. plain RTN, and is always on the grid,
  so the search is never worse than RTN on its own objective.
- `search_awq_clip(x, w, bits, group_size)` -> clip ratios [N, K // G] for `quantize_groups`: per
  group, the shrink of max|w| that minimizes that group's share of the output error (AutoAWQ's
  `_compute_best_clip`); ratio 1 (no clip) is always on the grid. With `separate=True` -> [N, K // G, 2]:
  the group's max and min shrink by their own ratios (every pair on the grid, plus the one-ratio
  candidates as pairs, so it is never worse than the one-ratio search; OmniQuant's learnable weight
  clipping, searched on a grid instead of learned). With `joint_sweeps=S > 0`, the per-group choice
  is only the start: S sweeps of coordinate descent over each output row's groups then choose every
  group's clip by the whole row's output error ‖Σ_g ΔW_g x_gᵀ‖², cross-group terms included (through
  the full Gram matrix), which the per-group error leaves out; each step keeps its group's current
  clip among the candidates, so a sweep never raises the row's error.
The graph pass folds s into the preceding op (W·s here, x/s there), searches the clip on the scaled
weight, then calls `quantize_groups(w * s, bits, group_size, clip_ratio=clip)`.

Output errors are evaluated as ΔW·xᵀ with ΔW = Q(W·s)/s - W, because Q(W·s)·(x/s) - W·x = ΔW·x.
When K <= n_tokens the error is computed through the Gram matrix H = xᵀx (‖ΔW xᵀ‖² = Σ (ΔW H) ⊙ ΔW),
which costs N·K² instead of N·K·n per candidate. All candidates of a grid are evaluated in one
batched pass, chunked over output rows so temporaries stay under `calib.CHUNK_ELEMENTS` floats.
"""
from typing import NamedTuple, Optional, Sequence

import torch

from llmopt.passes.compress.calib import calibration_rows, channel_abs_mean, rows_per_chunk
from llmopt.passes.compress.rtn import check_quantizable, fake_quant

MAX_TOKENS = 4096  # calibration rows kept per search (evenly spaced subsample)
JOINT_CHUNK_FACTOR = 4  # clip search chunks this many times calib.CHUNK_ELEMENTS when descending jointly


class AwqScales(NamedTuple):
    """Result of `search_awq_scales`; unpacks as `scales, alpha, duo, errors, candidates = ...`."""

    scales: torch.Tensor  # [K] fp32, on the weights' device: quantize W·s, feed x/s
    alpha: float  # the chosen exponent
    duo: bool  # whether the chosen candidate is of the duo family (divided by mean|ŵ|^(1 - alpha))
    errors: torch.Tensor  # [F, grid + 1] fp32 (CPU): mean squared output error per family and alpha = i / grid
    candidates: torch.Tensor  # [F, grid + 1, K] fp32: every candidate s, in the order of `errors`


def search_awq_scales(
    x: torch.Tensor,  # [n, K] calibration inputs of the linears
    weights: Sequence[torch.Tensor],  # [N_i, K] each: the linears that read x
    bits: int,
    group_size: int,
    grid: int = 20,
    symmetric: bool = False,
    max_tokens: int = MAX_TOKENS,
    duo: bool = True,
    ties: Optional[torch.Tensor] = None,  # [K] long: channels with equal entries get one scale
) -> AwqScales:
    """Grid search over alpha in {0, 1/grid, ..., 1} of s = mean|x|^alpha (and, with `duo`, of
    mean|x|^alpha / mean|ŵ|^(1 - alpha)); see the module docstring. With `ties` (the o_proj inputs
    that read one v channel under GQA), the means are pooled over each set of tied channels, so every
    candidate is equal over it and folds into the producer."""
    if not weights:
        raise ValueError("search_awq_scales: no weights given; pass the linears that read x")
    if grid < 1:
        raise ValueError(f"search_awq_scales: grid={grid} must be >= 1")
    k, device = weights[0].shape[-1], weights[0].device
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"search_awq_scales: every weight must be [N_i, K={k}], got {tuple(w.shape)}")
        check_quantizable(w, bits, group_size, None, "search_awq_scales")
    if ties is not None and (ties.shape != (k,) or ties.dtype != torch.long or int(ties.min()) < 0):
        raise ValueError(f"search_awq_scales: ties must be a [K={k}] tensor of non-negative longs, got {tuple(ties.shape)} {ties.dtype}")
    x_mean = _pooled(channel_abs_mean(x, k, device), ties)  # [K], over all tokens
    xs = calibration_rows(x, k, max_tokens, device, "search_awq_scales")  # [n, K]
    alphas = torch.arange(grid + 1, dtype=torch.float32) / grid  # [A]
    a = alphas.to(device).unsqueeze(1)  # [A, 1]
    scales = x_mean.unsqueeze(0).pow(a).clamp_min(1e-4)  # [A, K]
    if duo:
        w_mean = _pooled(_group_relative_abs_mean(weights, group_size), ties)  # [K]
        duo_scales = (x_mean.unsqueeze(0).pow(a) / (w_mean.unsqueeze(0).pow(1 - a) + 1e-4)).clamp_min(1e-4)  # [A, K]
        scales = torch.cat([scales, duo_scales])  # [F·A, K], F = 2 families
    scales = scales / (scales.amax(dim=1, keepdim=True) * scales.amin(dim=1, keepdim=True)).sqrt()
    gram = xs.t() @ xs if k <= xs.shape[0] else None  # [K, K] when cheaper than using xs directly
    errors = torch.zeros(scales.shape[0], dtype=torch.float64, device=device)  # [F·A]
    for w in weights:
        errors += _scaled_quant_error(w.float(), scales, xs, gram, bits, group_size, symmetric)
    errors = (errors / (xs.shape[0] * sum(w.shape[0] for w in weights))).float().cpu()
    if not bool(torch.isfinite(errors).all()):
        raise ValueError("search_awq_scales: the output error is not finite; inputs too large for fp32?")
    best = int(errors.argmin())  # first minimum: ties go to the plain family and the smaller alpha (RTN first)
    family, i = divmod(best, len(alphas))
    return AwqScales(
        scales=scales[best].clone(), alpha=float(alphas[i]), duo=family == 1,
        errors=errors.reshape(-1, len(alphas)), candidates=scales.reshape(-1, len(alphas), k),
    )


def search_awq_clip(
    x: torch.Tensor,  # [n, K] calibration inputs
    w: torch.Tensor,  # [N, K] (already scaled by the AWQ s, when AWQ scales are used)
    bits: int,
    group_size: int,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    symmetric: bool = False,
    max_tokens: int = MAX_TOKENS,
    separate: bool = False,
    joint_sweeps: int = 0,
) -> torch.Tensor:
    """-> clip ratios [N, K // G] fp32 in {1, 1 - 1/n_grid, ...} (> 1 - max_shrink), for `quantize_groups`;
    with `separate`, [N, K // G, 2]: (max ratio, min ratio) per group; `joint_sweeps`: coordinate
    descent on each row's whole output error (see the module docstring)."""
    if w.dim() != 2:
        raise ValueError(f"search_awq_clip: weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    check_quantizable(w, bits, group_size, None, "search_awq_clip")
    if n_grid < 1 or not 0.0 <= max_shrink < 1.0 or joint_sweeps < 0:
        raise ValueError(f"search_awq_clip: need n_grid >= 1, 0 <= max_shrink < 1 and joint_sweeps >= 0 "
                         f"(got {n_grid}, {max_shrink}, {joint_sweeps})")
    n_out, k = w.shape
    ng = k // group_size
    xs = calibration_rows(x, k, max_tokens, w.device, "search_awq_clip")  # [n, K]
    xg = xs.reshape(-1, ng, group_size).transpose(0, 1)  # [ng, n, G]
    gram = xg.transpose(1, 2) @ xg  # [ng, G, G]: per-group Gram blocks
    full_gram = xs.t() @ xs if joint_sweeps else None  # [K, K]: the cross-group blocks too
    n_ratios = max(1, int(max_shrink * n_grid))
    ratios = 1.0 - torch.arange(n_ratios, dtype=torch.float32, device=w.device) / n_grid  # [R]
    clip = torch.empty(n_out, ng, *((2,) if separate else ()), dtype=torch.float32, device=w.device)
    step = rows_per_chunk(n_ratios * (n_ratios + 1 if separate else 1) * k, w.device)
    if joint_sweeps:  # each descent step is a few small kernels whatever the chunk's size: fewer, larger chunks
        step *= JOINT_CHUNK_FACTOR
    for r0 in range(0, n_out, step):
        wc = w[r0 : r0 + step].float().reshape(-1, ng, group_size)  # [c, ng, G]
        cand = _clip_candidates(wc, ratios, separate)  # [C, c, ng] or [C, c, ng, 2]
        dq = fake_quant(wc.unsqueeze(0).expand(cand.shape[0], -1, -1, -1), bits, symmetric, cand).sub_(wc)  # [C, c, ng, G]
        t = dq.permute(2, 0, 1, 3).reshape(ng, -1, group_size)  # [ng, C·c, G]
        err = (t @ gram).mul_(t).sum(dim=-1).reshape(ng, cand.shape[0], -1)  # [ng, C, c]
        best = err.argmin(dim=1).t()  # [c, ng]; first minimum: ties keep candidate 0 (no clip)
        if joint_sweeps:
            best = _descend_rows(dq, err, best, full_gram, joint_sweeps)
        index = best.reshape(1, *best.shape, *((1,) * (cand.dim() - 3))).expand(1, *cand.shape[1:])
        clip[r0 : r0 + wc.shape[0]] = cand.gather(0, index)[0]
    return clip


def _descend_rows(dq: torch.Tensor, own: torch.Tensor, best: torch.Tensor, gram: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Coordinate descent over the groups of each row. dq: [C, c, ng, G] every candidate's ΔW; own:
    [ng, C, c] each candidate's ΔW_g H_gg ΔW_gᵀ; best: [c, ng] the start; gram: [K, K]. A row's error is
    Σ_g own_g + 2 Σ_{g<h} ΔW_g H_gh ΔW_hᵀ; group g's step minimizes own_g + 2 ΔW_g · r_g over the
    candidates, r_g = Σ_{h≠g} ΔW_h H_hg, the other groups held. -> [c, ng], the candidates chosen."""
    n_cand, c, ng, g_size = dq.shape
    rows = torch.arange(c, device=dq.device)
    best = best.clone()
    cur = dq[best, rows[:, None], torch.arange(ng, device=dq.device)]  # [c, ng, G] the chosen ΔW
    for _ in range(sweeps):
        for g in range(ng):
            cols = slice(g * g_size, (g + 1) * g_size)
            r = cur.reshape(c, -1) @ gram[:, cols] - cur[:, g] @ gram[cols, cols]  # [c, G]
            step = own[g] + 2 * (dq[:, :, g] * r).sum(dim=-1)  # [C, c]
            # the current choice wins ties, so the row's error never rises
            keep = step.gather(0, best[None, :, g]) <= step.min(dim=0, keepdim=True).values
            best[:, g] = torch.where(keep[0], best[:, g], step.argmin(dim=0))
            cur[:, g] = dq[best[:, g], rows, g]
    return best


def _clip_candidates(wc: torch.Tensor, ratios: torch.Tensor, separate: bool) -> torch.Tensor:
    """Clip candidates for the groups wc [c, ng, G], the first being no clip. Joint: ratios [R] of
    max|w| -> [R, c, ng]. Separate: (max ratio, min ratio) pairs [R² + R, c, ng, 2], every pair of
    `ratios` plus the joint candidates written as pairs (so the separate search is never worse)."""
    c, ng = wc.shape[:2]
    if not separate:
        return ratios.reshape(-1, 1, 1).expand(-1, c, ng)
    pairs = torch.cartesian_prod(ratios, ratios).reshape(-1, 1, 1, 2).expand(-1, c, ng, 2)  # [R², c, ng, 2]
    lo, hi = torch.aminmax(wc, dim=-1)  # [c, ng] each
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    bound = torch.maximum(hi, -lo) * ratios.reshape(-1, 1, 1)  # [R, c, ng]: the joint clip's bound
    joint = torch.stack([_shrink(hi, bound), _shrink(-lo, bound)], dim=-1)  # [R, c, ng, 2]
    return torch.cat([pairs, joint])


def _shrink(extent: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """The ratio that takes a range end of size `extent` [c, ng] to at most `bound` [R, c, ng] (1 for 0)."""
    return torch.where(extent > bound, bound / extent.clamp_min(1e-30), torch.ones_like(bound))


def _pooled(v: torch.Tensor, ties) -> torch.Tensor:
    """v [K] -> [K]: each entry replaced by the mean over its set of tied channels (v itself for None)."""
    if ties is None:
        return v
    ties = ties.to(v.device)
    sets = int(ties.max()) + 1
    totals = torch.zeros(sets, dtype=v.dtype, device=v.device).index_add_(0, ties, v)  # [sets]
    return (totals / torch.bincount(ties, minlength=sets).clamp_min(1).to(v.dtype))[ties]


def _group_relative_abs_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """-> [K] fp32: mean over every output row of |W| / (its group's max |W|), per input channel."""
    total, rows = 0.0, 0
    for w in weights:  # w: [N_i, K]
        n, k = w.shape
        wg = w.float().abs().reshape(n, k // group_size, group_size)  # [N_i, ng, G]
        total = total + (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).reshape(n, k).sum(dim=0)
        rows += n
    return total / rows


def _scaled_quant_error(
    w: torch.Tensor,  # [N, K] fp32
    scales: torch.Tensor,  # [A, K] candidate scales
    xs: torch.Tensor,  # [n, K]
    gram,  # [K, K] or None
    bits: int,
    group_size: int,
    symmetric: bool,
) -> torch.Tensor:
    """-> [A] fp64: ‖(Q(W·s_a)/s_a - W)·xᵀ‖² for every candidate a."""
    n_cand, k = scales.shape
    ng = k // group_size
    cols = k if gram is not None else xs.shape[0]
    errors = torch.zeros(n_cand, dtype=torch.float64, device=w.device)
    step = rows_per_chunk(n_cand * max(k, cols), w.device)
    s = scales.unsqueeze(1)  # [A, 1, K]
    for r0 in range(0, w.shape[0], step):
        wc = w[r0 : r0 + step]  # [c, K]
        ws = (wc.unsqueeze(0) * s).reshape(n_cand, -1, ng, group_size)  # [A, c, ng, G]
        dw = fake_quant(ws, bits, symmetric, None).reshape(n_cand, -1, k).div_(s).sub_(wc)  # [A, c, K]
        if gram is not None:
            errors += (dw @ gram).mul_(dw).sum(dim=(1, 2)).double()
        else:
            errors += (dw @ xs.t()).square_().sum(dim=(1, 2)).double()
    return errors
