"""LoRA merging on plain tensors, for full-precision and group-quantized (QLoRA) base weights.

Entry points:
- `merge_lora(w, a, b, scaling)` -> w + scaling·B@A, computed in fp32 and cast back to w.dtype
  (peft's `scaling` is lora_alpha / r).
- `requantize_merged(qw, a, b, scaling)` -> (QuantizedWeight, added_error): dequantize the base,
  merge in fp32, requantize with the base's bits, group size and symmetry, and report the relative
  Frobenius error ‖deq(Q(W')) - W'‖ / ‖W'‖ of the requantized merged weight W' against the exact one.
"""
from typing import Tuple

import torch

from llmopt.passes.compress.rtn import QuantizedWeight, quantize_groups


def merge_lora(
    w: torch.Tensor,  # [N, K]
    a: torch.Tensor,  # [r, K] lora_A
    b: torch.Tensor,  # [N, r] lora_B
    scaling: float,
) -> torch.Tensor:
    """-> [N, K] in w.dtype: w + scaling · b @ a, accumulated in fp32."""
    return _merged_fp32(w, a, b, scaling, "merge_lora").to(w.dtype)


def requantize_merged(
    qw: QuantizedWeight,
    a: torch.Tensor,  # [r, K]
    b: torch.Tensor,  # [N, r]
    scaling: float,
) -> Tuple[QuantizedWeight, float]:
    """-> (merged weight requantized like `qw`, relative Frobenius error of the requantization)."""
    base = qw.dequantize()  # [N, K] in the scales' dtype
    merged = _merged_fp32(base, a, b, scaling, "requantize_merged")  # [N, K] fp32, the exact merge
    requantized = quantize_groups(merged.to(base.dtype), qw.bits, qw.group_size, symmetric=qw.symmetric)
    diff = torch.linalg.vector_norm(requantized.dequantize().float() - merged)
    added_error = float(diff / torch.linalg.vector_norm(merged).clamp_min(torch.finfo(torch.float32).tiny))
    return requantized, added_error


def _merged_fp32(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, who: str) -> torch.Tensor:
    if w.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        shapes = f"{tuple(w.shape)}, {tuple(a.shape)}, {tuple(b.shape)}"
        raise ValueError(f"{who}: expected w [N, K], a [r, K], b [N, r]; got {shapes}")
    (n, k), r = w.shape, a.shape[0]
    if a.shape[1] != k or b.shape != (n, r):
        raise ValueError(
            f"{who}: shapes do not chain: w {tuple(w.shape)}, a {tuple(a.shape)} (want [r, {k}]), "
            f"b {tuple(b.shape)} (want [{n}, r={r}])"
        )
    return w.float() + scaling * (b.float() @ a.float())
