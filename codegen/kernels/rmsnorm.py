"""Fused residual add + RMSNorm (or LayerNorm) in Triton, optionally quantizing its output to int8.

Entry points:
- `residual_rmsnorm(x [..., K], residual or None, weight [K], eps, quantize=False) -> NormOutput`
- `residual_layernorm(x [..., K], residual or None, weight [K], bias [K], eps, quantize=False) -> NormOutput`
- `residual_rmsnorm_torch(...)`: the eager PyTorch function the kernel fuses (the oracle and the baseline).

One program normalizes one row in one pass: h = x + residual (rounded to the input dtype, as eager
PyTorch rounds it), y = rmsnorm(h) * weight with Llama's rounding order (normalize in fp32, round to the
input dtype, multiply by the weight), and with `quantize=True` also q = round(y / s) as int8 with
s = max|y| / 127 per row: the same numbers as `llmopt.ops.quantize_per_token(y)`.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

INT8_MAX = tl.constexpr(127.0)


class NormOutput(NamedTuple):
    y: torch.Tensor  # [..., K], the input dtype
    residual: torch.Tensor  # [..., K]: h = x + residual, the next layer's residual
    q: Optional[torch.Tensor]  # [M, K] int8 with quantize=True
    scale: Optional[torch.Tensor]  # [M, 1] fp32 with quantize=True


def _configs():
    if triton.knobs.runtime.interpret:
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (4, 8, 16)]


@triton.jit
def _round_half_even(v):
    """torch.round's rounding (ties to even) for |v| < 2**22; libdevice.rint has no interpreter version."""
    r = tl.floor(v + 0.5)
    odd = (r.to(tl.int32) & 1) == 1
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.autotune(configs=_configs(), key=["K", "QUANT"], cache_results=True)
@triton.jit
def _residual_norm_kernel(
    # tensors: rows of K elements
    x_ptr, res_ptr, w_ptr, b_ptr,  # x/res: [M, K], w/b: [K]
    y_ptr, h_ptr,  # [M, K] the input dtype
    q_ptr, scale_ptr,  # [M, K] int8, [M] fp32 (QUANT only)
    # strides of the rows
    stride_x, stride_r, stride_y, stride_h, stride_q,
    K, eps,
    HAS_RESIDUAL: tl.constexpr, LAYERNORM: tl.constexpr, QUANT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)  # [BLOCK_K]
    if HAS_RESIDUAL:
        h = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LAYERNORM:
        centered = tl.where(mask, hf - tl.sum(hf, 0) / K, 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, 0) / K + eps)
        y = (centered * rstd * w + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
    else:
        rstd = tl.rsqrt(tl.sum(hf * hf, 0) / K + eps)
        y = (w * (hf * rstd).to(dtype).to(tl.float32)).to(dtype)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)
    if QUANT:
        yf = y.to(tl.float32)
        scale = tl.div_rn(tl.maximum(tl.max(tl.abs(yf), 0), 1e-8), INT8_MAX)
        q = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(yf, scale)), -INT8_MAX), INT8_MAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=mask)
        tl.store(scale_ptr + row, scale)


def _residual_norm(x, residual, weight, bias, eps, quantize, layernorm):
    k = x.shape[-1]
    if weight.shape != (k,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"residual norm: x {x.shape}, residual {None if residual is None else residual.shape}, weight {weight.shape}")
    x2 = x.reshape(-1, k)  # [M, K]
    r2 = x2 if residual is None else residual.reshape(-1, k)  # [M, K]
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        x2, r2 = x2.contiguous(), r2.contiguous()
    m = x2.shape[0]
    y = torch.empty_like(x2)  # [M, K]
    h = x2 if residual is None else torch.empty_like(x2)  # [M, K]
    q = torch.empty(m, k if quantize else 0, device=x.device, dtype=torch.int8)  # [M, K]
    scale = torch.empty(m, 1 if quantize else 0, device=x.device, dtype=torch.float32)  # [M, 1]
    _residual_norm_kernel[(m,)](
        x2, r2, weight, weight if bias is None else bias, y, h, q, scale,
        x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), q.stride(0),
        k, eps,
        HAS_RESIDUAL=residual is not None, LAYERNORM=layernorm, QUANT=quantize, BLOCK_K=triton.next_power_of_2(k),
    )
    return NormOutput(y.reshape(x.shape), h.reshape(x.shape), q if quantize else None, scale if quantize else None)


def residual_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float, quantize: bool = False) -> NormOutput:
    """x, residual: [..., K] fp16/bf16/fp32, weight: [K]. One read of x and residual, one write of y and h."""
    return _residual_norm(x, residual, weight, None, eps, quantize, layernorm=False)


def residual_layernorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                       eps: float, quantize: bool = False) -> NormOutput:
    """LayerNorm variant: y = (h - mean) / sqrt(var + eps) * weight + bias, computed in fp32, rounded once."""
    return _residual_norm(x, residual, weight, bias, eps, quantize, layernorm=True)


def residual_rmsnorm_torch(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
    """Eager PyTorch (Llama's RMSNorm after a residual add) -> (y, h)."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return y, h
