"""W8A8 (SmoothQuant, Xiao et al. 2023) on plain tensors: weight quantization, smoothing scales, search.

Entry points:
- `quantize_weight_per_channel(w)` -> (int8 [N, K], fp32 scale [N]), the layout of
  `torch.ops.llmopt.linear_w8a8` (symmetric, scale = max|w_n| / 127).
- `smooth_scales(act_absmax, weights, alpha)` -> s [K]: s_j = max|X_j|^alpha / max_i max_n |W_i[n, j]|^(1-alpha).
  The graph pass divides the activation by s (folded into the preceding norm) and multiplies the
  weight columns by s; then max|X_j / s_j| = m_j^(1-alpha) and max_n |W[n, j]·s_j| = m_j^alpha with
  m_j = max|X_j| · max|W_:,j|, i.e. alpha moves quantization difficulty from activations to weights.
- `search_smooth_alpha(x, weights)` -> alpha: the grid value with the smallest W8A8 output error
  (per-token activation quantization, per-channel weight quantization) summed over the linears.
- `static_act_scale(act_absmax)` -> [1] fp32: the per-tensor activation scale for `act_scale`.
"""
from typing import Sequence, Tuple

import torch

from llmopt.ops.linear_w8a8 import INT8_MAX, quantize_per_token
from llmopt.passes.compress.calib import calibration_rows, channel_abs_max, rows_per_chunk

DEFAULT_ALPHAS = tuple(round(0.30 + 0.05 * i, 2) for i in range(13))  # 0.30, 0.35, ..., 0.90
SMOOTH_EPS = 1e-5  # floor of both statistics and of s, and 1 / SMOOTH_EPS its ceiling
MAX_TOKENS = 2048  # calibration rows kept by `search_smooth_alpha`


def quantize_weight_per_channel(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] float -> (q: [N, K] int8, scale: [N] fp32), symmetric, round-to-nearest."""
    _check_weight(w, None, "quantize_weight_per_channel")
    scale = w.float().abs().amax(dim=1).clamp_min(1e-8) / INT8_MAX  # [N]
    q = torch.round(w.float() / scale.unsqueeze(1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def smooth_scales(
    act_absmax: torch.Tensor,  # [K] max |x_j| over calibration tokens
    weights: Sequence[torch.Tensor],  # [N_i, K] each: the linears that read x
    alpha: float,
) -> torch.Tensor:
    """-> s: [K] fp32 on act_absmax's device, clamped to [SMOOTH_EPS, 1 / SMOOTH_EPS]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_scales: alpha={alpha} must lie in [0, 1]")
    if act_absmax.dim() != 1:
        raise ValueError(f"smooth_scales: act_absmax must be [K], got shape {tuple(act_absmax.shape)}")
    if not bool(torch.isfinite(act_absmax).all()) or bool((act_absmax < 0).any()):
        raise ValueError("smooth_scales: act_absmax must be finite and >= 0 (a per-channel max |x|)")
    if not weights:
        raise ValueError("smooth_scales: no weights given; pass the linears that read x")
    k = act_absmax.shape[0]
    w_absmax = torch.zeros(k, dtype=torch.float32, device=act_absmax.device)  # [K]
    for w in weights:
        _check_weight(w, k, "smooth_scales")
        w_absmax = torch.maximum(w_absmax, w.float().abs().amax(dim=0).to(act_absmax.device))
    a = act_absmax.float().clamp_min(SMOOTH_EPS).pow(alpha)
    b = w_absmax.clamp_min(SMOOTH_EPS).pow(1.0 - alpha)
    return (a / b).clamp_(SMOOTH_EPS, 1.0 / SMOOTH_EPS)


def search_smooth_alpha(
    x: torch.Tensor,  # [n, K] calibration inputs of the linears
    weights: Sequence[torch.Tensor],  # [N_i, K] each
    grid: Sequence[float] = DEFAULT_ALPHAS,
    max_tokens: int = MAX_TOKENS,
) -> float:
    """-> the alpha of `grid` minimizing Σ_i ‖Q(x/s)·Q(W_i·s)ᵀ - x·W_iᵀ‖² (first one on ties)."""
    if not weights:
        raise ValueError("search_smooth_alpha: no weights given; pass the linears that read x")
    if len(grid) == 0:
        raise ValueError("search_smooth_alpha: empty alpha grid")
    k, device = weights[0].shape[-1], weights[0].device
    for w in weights:
        _check_weight(w, k, "search_smooth_alpha")
    act_absmax = channel_abs_max(x, k, device)  # [K], over all tokens
    xs = calibration_rows(x, k, max_tokens, device, "search_smooth_alpha")  # [n, K]
    errors = []
    for alpha in grid:
        s = smooth_scales(act_absmax, weights, float(alpha))  # [K]
        qx, sx = quantize_per_token(xs / s)  # [n, K] int8, [n, 1]
        xq = qx.float() * sx  # [n, K] what the int8 kernel sees, dequantized
        err = 0.0
        for w in weights:
            err += _w8a8_error(xs, xq, w.float(), s)
        errors.append(err)
    return float(grid[min(range(len(grid)), key=errors.__getitem__)])


def static_act_scale(act_absmax: torch.Tensor) -> torch.Tensor:
    """act_absmax: [K] (or any shape) -> [1] fp32 per-tensor scale for `quantize_static`."""
    if act_absmax.numel() == 0 or not bool(torch.isfinite(act_absmax).all()):
        raise ValueError("static_act_scale: act_absmax must be non-empty and finite")
    return (act_absmax.float().abs().amax().clamp_min(1e-8) / INT8_MAX).reshape(1)


def _w8a8_error(xs: torch.Tensor, xq: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> float:
    """‖xq·Q(W·s)ᵀ - xs·Wᵀ‖² for xs: [n, K], xq: [n, K] (quantized xs/s), w: [N, K], s: [K]."""
    err = 0.0
    step = rows_per_chunk(xs.shape[0] + xs.shape[1], w.device)
    for r0 in range(0, w.shape[0], step):
        wc = w[r0 : r0 + step]  # [c, K]
        qw, sw = quantize_weight_per_channel(wc * s)  # [c, K] int8, [c]
        y = (xq @ qw.float().t()) * sw  # [n, c]
        err += float((y - xs @ wc.t()).pow(2).sum())
    return err


def _check_weight(w: torch.Tensor, k, who: str) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{who}: weight must be a 2-D float [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    if k is not None and w.shape[1] != k:
        raise ValueError(f"{who}: weight has K={w.shape[1]}, expected K={k} (shape {tuple(w.shape)})")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{who}: weight contains NaN or Inf; fix the checkpoint before quantizing")
