"""W8A8 linear on int8 tensor cores: y = (q(x) @ Wᵀ) · s_x · s_w (+ bias) (+ residual).

Entry points:
- `linear_w8a8(x, weight, weight_scale, bias, act_scale, residual=None)`, the Triton form of
  `torch.ops.llmopt.linear_w8a8` with an optional fused residual add. Two launches: the activation
  quantization (`quantize_rows`, bit-identical to the reference) and one GEMM whose int32 accumulator
  gets the whole epilogue (row scale, column scale, bias, residual, cast) in registers;
- `linear_int8(q, row_scale, weight, weight_scale, bias, out_dtype)`: the GEMM alone, on activations
  quantized already. Lowering calls it (`llmopt.codegen.quantize_inputs`): linears that share an input
  share its quantization, which a generated kernel fuses into the op that makes the input.

The weight stays in its canonical `[N, K]` row-major int8 layout: that is already K-major for the
B operand, which is what int8 tensor-core instructions read, so there is no repacking step.
Autotuned per (M bucket, N, K) and GPU.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

from llmopt.codegen.kernels.quantize_rows import quantize_rows


def _configs():
    if triton.knobs.runtime.interpret:  # one small config: the interpreter runs each program in Python
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 4),
        (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 64, 8, 4), (128, 128, 256, 8, 3),
        (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (32, 64, 256, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def _quick_bench(kernel_call, quantiles):
    """Autotuning's timer: short, since tuning runs once per shape and GPU, on the first call."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _prune(configs, named_args, **kwargs):
    """Tiles no taller than the M bucket (a 256-row tile wastes most of itself on 16 tokens)."""
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(named_args["M_BUCKET"], 64)]
    return fitting or configs[-1:]


@triton.autotune(
    configs=_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune}, do_bench=_quick_bench,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _w8a8_gemm_kernel(
    # int8 operands
    a_ptr,  # a: [M, K] int8, quantized activations
    b_ptr,  # b: [N, K] int8, weight
    # epilogue operands
    sa_ptr,  # sa: [M] fp32 row scales (row stride 0 for a static per-tensor scale)
    sb_ptr,  # sb: [N] fp32 column scales
    bias_ptr,  # bias: [N], read if HAS_BIAS
    res_ptr,  # res: [M, N], read if HAS_RESIDUAL
    c_ptr,  # c: [M, N] output in the activation dtype
    # sizes and strides (inner strides are 1)
    M, N, K,
    M_BUCKET,  # autotuning key only
    stride_am, stride_bn, stride_sam, stride_rm, stride_cm,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped launch order: GROUP_M row tiles share each weight column tile while it is in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_n)
    first_m = group_id * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % M  # wrapped so every load is in bounds; the store masks the extra rows
    cols = offs_n % N
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], a view of Wᵀ

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # epilogue, in fp32 and in the reference's order: ((acc * s_x) * s_w + bias) + residual
    sa = tl.load(sa_ptr + rows * stride_sam)  # [BLOCK_M]
    sb = tl.load(sb_ptr + cols)  # [BLOCK_N]
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


def int8_gemm_scaled(
    q: torch.Tensor,  # [M, K] int8
    weight: torch.Tensor,  # [N, K] int8
    row_scale: torch.Tensor,  # [M, 1] or [1, 1] fp32
    weight_scale: torch.Tensor,  # [N] fp32
    bias: Optional[torch.Tensor],  # [N] or None
    residual: Optional[torch.Tensor],  # [M, N] or None
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """-> [M, N] in `out_dtype`: (q @ weightᵀ) · row_scale · weight_scale (+ bias) (+ residual)."""
    m, k = q.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.dtype == torch.int8 and weight.stride(1) == 1
    assert m * k < 2**31 and n * k < 2**31 and m * n < 2**31, "32-bit offsets"
    weight_scale = weight_scale.to(torch.float32).contiguous()
    sa = row_scale.expand(m, 1)  # a static scale gets row stride 0
    c = torch.empty(m, n, dtype=out_dtype, device=q.device)  # c: [M, N]
    if m == 0:
        return c
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _w8a8_gemm_kernel[grid](
        q, weight, sa, weight_scale, bias if bias is not None else weight_scale,
        residual if residual is not None else c, c,
        m, n, k, min(triton.next_power_of_2(m), 4096),
        q.stride(0), weight.stride(0), sa.stride(0),
        residual.stride(0) if residual is not None else 0, c.stride(0),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
    )
    return c


def linear_int8(
    q: torch.Tensor,  # [..., K] int8, quantized activations
    row_scale: torch.Tensor,  # [..., 1] fp32 (per token), or 1 element (a static per-tensor scale)
    weight: torch.Tensor,  # [N, K] int8
    weight_scale: torch.Tensor,  # [N] fp32
    bias: Optional[torch.Tensor],  # [N] or None
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """-> [..., N] in `out_dtype`: (q @ weightᵀ) · row_scale · weight_scale (+ bias), one launch."""
    lead, k = q.shape[:-1], q.shape[-1]
    q2 = q.reshape(-1, k).contiguous()  # q2: [M, K]
    y = int8_gemm_scaled(q2, weight.contiguous(), row_scale.reshape(-1, 1), weight_scale, bias, None, out_dtype)
    return y.reshape(*lead, weight.shape[0])


def linear_w8a8(
    x: torch.Tensor,  # [..., K] fp16/bf16/fp32
    weight: torch.Tensor,  # [N, K] int8
    weight_scale: torch.Tensor,  # [N] fp32
    bias: Optional[torch.Tensor],  # [N] or None
    act_scale: Optional[torch.Tensor],  # [1] fp32 (static) or None (per token, dynamic)
    residual: Optional[torch.Tensor] = None,  # [..., N] or None, added before the cast
) -> torch.Tensor:
    """Same function as `torch.ops.llmopt.linear_w8a8` (+ `residual`), as two Triton launches."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # x2: [M, K]
    q, row_scale = quantize_rows(x2, act_scale)
    res2 = None if residual is None else residual.reshape(-1, n).contiguous()  # res2: [M, N]
    y = int8_gemm_scaled(q, weight.contiguous(), row_scale, weight_scale, bias, res2, x.dtype)
    return y.reshape(*lead, n)
