"""Int8 activation quantization in one Triton kernel: per token (one scale per row) or per tensor.

Entry point: `quantize_rows(x [M, K] float, act_scale=None) -> (q [M, K] int8, scale)`.
- `act_scale=None`: dynamic, `scale` is `[M, 1]` fp32, `amax(|x_row|).clamp_min(1e-8) / 127`;
- `act_scale` a 1-element fp32 tensor: static, `scale` is `act_scale` viewed as `[1, 1]`.

Bit-identical to the reference (`llmopt.ops.linear_w8a8.quantize_per_token` / `quantize_static`)
on the device it runs on: the same fp32 amax, correctly rounded divisions (`div_rn`, not the
approximate `/`) and round-half-to-even as `torch.round` does. `amax / 127` follows torch: on CUDA
torch divides a tensor by a Python scalar as a product with the fp32 reciprocal, on CPU it divides.
One program per row, which stays in registers: one read of x, one write of q.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from llmopt.ops import linear_w8a8 as reference

INT8_MAX = tl.constexpr(reference.INT8_MAX)
INV_INT8_MAX = tl.constexpr(reference.INV_INT8_MAX)  # torch's fp32 reciprocal of 127 (CUDA)


@triton.jit
def _round_half_even(v):
    """v: fp32 with |v| < 2**22 -> the nearest integer, ties to even (torch.round)."""
    r = tl.floor(v + 0.5)  # exact: v + 0.5 needs no rounding at these magnitudes
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _quantize_rows_kernel(
    # tensors
    x_ptr,  # x: [M, K] fp16/bf16/fp32
    q_ptr,  # q: [M, K] int8 (written)
    scale_ptr,  # scale: [M] fp32, written (dynamic) or [1] fp32, read (STATIC)
    # sizes and strides
    K,
    stride_xm,
    stride_qm,
    # meta-parameters
    STATIC: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr,  # amax * fl(1/127) (torch on CUDA) instead of amax / 127
    BLOCK_K: tl.constexpr,  # >= K: the whole row in one tile
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)  # [BLOCK_K]
    if STATIC:
        scale = tl.load(scale_ptr)
    else:
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8)
        if SCALE_BY_RECIPROCAL:
            scale = amax * INV_INT8_MAX
        else:
            scale = tl.math.div_rn(amax, INT8_MAX)
        tl.store(scale_ptr + row, scale)
    q = _round_half_even(tl.math.div_rn(x, scale))
    q = tl.minimum(tl.maximum(q, -INT8_MAX), INT8_MAX)
    tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=offs < K)


def quantize_rows(x: torch.Tensor, act_scale: Optional[torch.Tensor] = None):
    """x: [M, K] float -> (q: [M, K] int8, scale: [M, 1] fp32, or [1, 1] for a static scale)."""
    assert x.dim() == 2 and x.stride(1) == 1, "quantize_rows wants a row-major [M, K] tensor"
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)  # q: [M, K]
    if act_scale is None:
        scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)  # scale: [M, 1]
    else:
        assert act_scale.numel() == 1, "a static activation scale has one element"
        scale = act_scale.to(torch.float32).reshape(1, 1)  # scale: [1, 1]
    if m == 0:
        return q, scale
    block_k = triton.next_power_of_2(k)
    assert block_k <= 65536, f"K={k}: rows longer than 65536 need a looped kernel"
    _quantize_rows_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        STATIC=act_scale is not None, SCALE_BY_RECIPROCAL=x.is_cuda, BLOCK_K=block_k,
        num_warps=min(16, max(4, block_k // 1024)),  # <= 32 values of the row per thread
    )
    return q, scale
