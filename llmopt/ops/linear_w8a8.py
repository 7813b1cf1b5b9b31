"""`torch.ops.llmopt.linear_w8a8`: y = (q8(x) @ W8ᵀ) · s_x · s_w + bias, int32 accumulation.

Weights: int8 `[N, K]`, symmetric, one fp32 scale per output channel `[N]`.
Activations: quantized at run time, one scale per token (`act_scale=None`), or with one static
per-tensor scale from calibration (`act_scale` a 1-element fp32 tensor).
"""
from typing import Optional

import torch

INT8_MAX = 127.0
# fl32(1 / 127): torch on CUDA divides a tensor by the Python scalar 127 as a product with this
# reciprocal (on CPU it divides), so kernels that match the reference bit for bit on CUDA use it
INV_INT8_MAX = float(torch.tensor(1.0, dtype=torch.float32) / INT8_MAX)


def quantize_per_token(x: torch.Tensor):
    """x: [M, K] float -> (q: [M, K] int8, scale: [M, 1] fp32), symmetric, round-to-nearest."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / INT8_MAX
    q = torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor):
    """x: [M, K] float, scale: [1] fp32 -> q: [M, K] int8."""
    return torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a: [M, K] int8, b_t: [N, K] int8 -> [M, N] int32, exact."""
    if a.shape[0] > 16 and a.shape[1] % 8 == 0 and b_t.shape[0] % 8 == 0:
        return torch._int_mm(a, b_t.t())
    # small or odd shapes: float64 holds every int8 dot product of K < 2^38 exactly
    return (a.double() @ b_t.double().t()).to(torch.int32)


@torch.library.custom_op("llmopt::linear_w8a8", mutates_args=())
def linear_w8a8(
    x: torch.Tensor,  # [..., K] float
    weight: torch.Tensor,  # [N, K] int8
    weight_scale: torch.Tensor,  # [N] fp32
    bias: Optional[torch.Tensor],  # [N] or None
    act_scale: Optional[torch.Tensor],  # [1] fp32 (static per-tensor) or None (per token)
) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if act_scale is None:
        q, s_x = quantize_per_token(x2)
    else:
        q, s_x = quantize_static(x2, act_scale), act_scale.float().reshape(1, 1)
    acc = int8_matmul(q, weight)  # [M, N] int32
    y = acc.float() * s_x * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


@linear_w8a8.register_fake
def _(x, weight, weight_scale, bias, act_scale):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
