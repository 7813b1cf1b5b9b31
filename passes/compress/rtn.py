"""Round-to-nearest (RTN) group quantization of a weight into llmopt's canonical storage layout.

Entry points: `quantize_groups(w, bits, group_size)` -> `QuantizedWeight` (the layout that
`torch.ops.llmopt.linear_wq` reads, see `llmopt/ops/linear_wq.py`), and `fake_quantize_groups`, the
same rounding returned as a dequantized float weight (what searches such as AWQ evaluate).

Conventions (per group of `group_size` consecutive inputs of one output row, qmax = 2^bits - 1):
- asymmetric (default, as GPTQ/AutoAWQ with a zero point): the range [lo, hi] is widened to hold 0
  (lo = min(min w, 0), hi = max(max w, 0)), scale = (hi - lo) / qmax, zero = round(-lo / scale).
  Including 0 keeps every weight within scale/2 of its dequantized value, even all-positive groups.
- symmetric (AutoAWQ `zero_point=False`): scale = max|w| / (2^(bits-1) - 1), zero = 2^(bits-1);
  codes use [1, qmax] for the range [-max|w|, max|w|] (code 0 = -2^(bits-1)·scale is reachable but
  only used by clipped weights).
- code q = clamp(round(w / scale) + zero, 0, qmax); dequantized w = (q - zero) * scale.
- `clip_ratio` r (from `search_awq_clip`), one per group in (0, 1]: weights are clipped to
  ±r·max|w| of their group before the range is taken (AutoAWQ's clip). A pair per group
  ([..., K // G, 2], from `search_awq_clip(separate=True)`) shrinks the range's ends separately:
  [r₁·lo, r₀·hi] (OmniQuant's clip).
Scales are stored in the weight's dtype, rounded up (so the half-step bound survives fp16/bf16), and
codes are computed from the stored scales, so `fake_quantize_groups(w, ...)` equals
`quantize_groups(w, ...).dequantize()` exactly.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from llmopt.ops.linear_wq import dequantize_groups, pack_int4, unpack_int4

SUPPORTED_BITS = (3, 4, 8)


@dataclass(frozen=True)
class QuantizedWeight:
    """A group-quantized weight in the `linear_wq` layout (see `llmopt/ops/linear_wq.py`)."""

    qweight: torch.Tensor  # uint8: [N, K // 2] for bits <= 4 (two codes per byte), [N, K] for 8
    scales: torch.Tensor  # [N, K // G] float (the weight's dtype)
    zeros: torch.Tensor  # [N, K // G] float, integer-valued zero points
    bits: int
    group_size: int
    symmetric: bool = False

    @classmethod
    def from_codes(cls, codes, scales, zeros, bits: int, group_size: int, symmetric: bool = False) -> "QuantizedWeight":
        """codes: [N, K] integer-valued in [0, 2^bits - 1]; scales, zeros: [N, K // G] in their storage dtype."""
        q = codes.to(torch.uint8)
        return cls(pack_int4(q) if bits <= 4 else q, scales, zeros, bits, group_size, symmetric)

    def codes(self) -> torch.Tensor:
        """-> [N, K] uint8 integer codes in [0, 2^bits - 1]."""
        return unpack_int4(self.qweight) if self.bits <= 4 else self.qweight

    def dequantize(self) -> torch.Tensor:
        """-> W: [N, K] in the dtype of `scales`."""
        return dequantize_groups(self.qweight, self.scales, self.zeros, self.group_size, self.bits)


def quantize_groups(
    w: torch.Tensor,  # [N, K] float
    bits: int,
    group_size: int,
    symmetric: bool = False,
    clip_ratio: Optional[torch.Tensor] = None,  # [N, K // G] or [N, K // G, 2] in (0, 1], or None
) -> QuantizedWeight:
    """Round-to-nearest group quantization of `w` into the canonical `linear_wq` layout."""
    if w.dim() != 2:
        raise ValueError(f"quantize_groups: weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    check_quantizable(w, bits, group_size, clip_ratio, "quantize_groups")
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)  # [N, ng, G]
    scale, zero = group_scale_zero(wg, bits, symmetric, clip_ratio, w.dtype)  # [N, ng, 1] each
    q = quantize_codes(wg, scale, zero, bits).reshape(n, k)  # [N, K]
    return QuantizedWeight.from_codes(q, scale.squeeze(-1).to(w.dtype), zero.squeeze(-1).to(w.dtype), bits, group_size, symmetric)


def fake_quantize_groups(
    w: torch.Tensor,  # [..., K] float (any leading dims, e.g. [N, K] or [A, N, K])
    bits: int,
    group_size: int,
    symmetric: bool = False,
    clip_ratio: Optional[torch.Tensor] = None,  # [..., K // G] or [..., K // G, 2] in (0, 1], or None
) -> torch.Tensor:
    """Quantize then dequantize `w` with the conventions of `quantize_groups` -> [..., K], w.dtype."""
    check_quantizable(w, bits, group_size, clip_ratio, "fake_quantize_groups")
    wg = w.float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)  # [..., ng, G]
    return fake_quant(wg, bits, symmetric, clip_ratio, w.dtype).reshape(w.shape).to(w.dtype)


def fake_quant(
    wg: torch.Tensor,  # [..., ng, G] fp32
    bits: int,
    symmetric: bool,
    clip_ratio: Optional[torch.Tensor],  # [..., ng], [..., ng, 2] or None
    scale_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unchecked fake quantization of grouped fp32 weights -> [..., ng, G] fp32 (search inner loop)."""
    scale, zero = group_scale_zero(wg, bits, symmetric, clip_ratio, scale_dtype)
    return quantize_codes(wg, scale, zero, bits).sub_(zero).mul_(scale)


def group_scale_zero(
    wg: torch.Tensor,  # [..., ng, G] fp32
    bits: int,
    symmetric: bool,
    clip_ratio: Optional[torch.Tensor],  # [..., ng], [..., ng, 2] (max ratio, min ratio) or None
    scale_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (scale, zero): [..., ng, 1] fp32 each; scale already rounded to `scale_dtype`."""
    qmax = 2**bits - 1
    lo, hi = torch.aminmax(wg, dim=-1, keepdim=True)  # [..., ng, 1] each
    lo, hi = lo.clamp_max_(0.0), hi.clamp_min_(0.0)
    if clip_ratio is not None and clip_ratio.dim() == wg.dim():  # [..., ng, 2]: (max, min) shrunk separately
        ratio = clip_ratio.to(wg.device, torch.float32)
        hi, lo = hi * ratio[..., :1], lo * ratio[..., 1:]
    elif clip_ratio is not None:
        bound = torch.maximum(hi, -lo) * clip_ratio.to(wg.device, torch.float32).unsqueeze(-1)
        hi, lo = torch.minimum(hi, bound), torch.maximum(lo, -bound)
    if symmetric:
        scale = _store(torch.maximum(hi, -lo) / (2 ** (bits - 1) - 1), scale_dtype)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    scale = _store((hi - lo) / qmax, scale_dtype)
    zero = torch.round(-lo / scale).clamp_(0, qmax)
    return scale, zero


def quantize_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """wg: [..., ng, G] fp32, scale/zero: [..., ng, 1] -> codes [..., ng, G] fp32 in [0, 2^bits-1]."""
    return (wg / scale).round_().add_(zero).clamp_(0, 2**bits - 1)


def check_quantizable(w, bits, group_size, clip_ratio, who: str) -> None:
    """Raises ValueError naming what is wrong with a quantization request and how to fix it."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{who}: bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    if not w.is_floating_point():
        raise ValueError(f"{who}: weight must be a float tensor, got {w.dtype}")
    k = w.shape[-1]
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(
            f"{who}: group_size={group_size} does not divide K={k} (weight shape {tuple(w.shape)}); "
            f"pick a group size that divides K (e.g. {_divisor_hint(k)})"
        )
    if bits <= 4 and k % 2 != 0:
        raise ValueError(f"{who}: {bits}-bit codes are packed two per byte, so K must be even (K={k})")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int((~finite).sum()) - n_nan
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        raise ValueError(
            f"{who}: weight has {n_nan} NaN and {n_inf} Inf values (first at index {first}); "
            "fix the weight (a diverged checkpoint, a bad scale fold or an overflowing cast) before quantizing"
        )
    if clip_ratio is not None:
        expected = (*w.shape[:-1], k // group_size)
        if tuple(clip_ratio.shape) not in (expected, (*expected, 2)):
            raise ValueError(f"{who}: clip_ratio has shape {tuple(clip_ratio.shape)}, expected {expected} (or {(*expected, 2)} for separate max and min)")
        if not bool(((clip_ratio > 0) & (clip_ratio <= 1)).all()):
            raise ValueError(f"{who}: clip_ratio values must lie in (0, 1]")


def _store(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rounds fp32 scales up to their storage dtype, never to 0, and back to fp32.

    Rounding up keeps qmax·scale >= the group's range, so no weight is clamped by more than half a
    step even in bf16 (8 mantissa bits); a nonzero scale keeps w / scale finite for all-zero groups.
    """
    stored = scale.to(dtype)
    stored = torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    return stored.clamp_min(torch.finfo(dtype).tiny).float()


def _divisor_hint(k: int) -> int:
    return next((g for g in (128, 64, 32, 16, 8) if k % g == 0), k)
