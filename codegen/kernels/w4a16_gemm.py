"""Weight-only group-quantized linear (W4/W3/W8, A16/A32) in Triton, reading the canonical layout.

Entry point: `linear_wq(x, qweight, scales, zeros, bias, group_size, bits)`, the same function as
`torch.ops.llmopt.linear_wq` up to fp32 accumulation order. The weight is read as stored
(`llmopt/ops/linear_wq.py`): uint8 `[N, K // 2]` nibbles for bits <= 4 (3-bit values sit in 4-bit
slots), uint8 `[N, K]` for bits == 8; rows are contiguous along K, so the packed bytes load
with wide coalesced accesses and no repacking step is needed. Nibbles are unpacked in registers and
dequantized in the dtype of `scales`, exactly as the reference: `W = (q - zero) * scale`.

Two kernels, picked by M:
- M <= 16 (decode): `_wq_gemv_kernel`, a GEMV (M == 1: multiply-and-reduce on CUDA cores) or a
  16-row tensor-core dot (2 <= M <= 16), with split-K: the last program of a column tile (an atomic
  counter that resets itself) sums the fp32 partials, so a call is a single launch.
- M > 16 (prefill): `_wq_gemm_kernel`, a tiled GEMM with the weight tile dequantized before `tl.dot`.
Both are autotuned per (M bucket, N, K, group size) and GPU.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

_INTERPRET = triton.knobs.runtime.interpret
DECODE_MAX_M = 16
_MAX_SPLIT_K = 4


def _cfg(bm, bn, bk, warps, stages, split_k=None):
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    if split_k is not None:  # GEMV configs only
        meta["SPLIT_K"] = split_k
    return triton.Config(meta, num_warps=warps, num_stages=stages)


if _INTERPRET:  # small tiles: the interpreter runs each program in Python and cannot time configs
    _GEMV_CONFIGS = [_cfg(1, 16, 64, 4, 1, 3), _cfg(1, 16, 32, 4, 1, 3), _cfg(16, 32, 64, 4, 1, 2), _cfg(16, 32, 32, 4, 1, 2)]
    _GEMM_CONFIGS = [_cfg(32, 32, 64, 4, 1), _cfg(32, 32, 32, 4, 1)]
else:
    _GEMV_CONFIGS = [
        _cfg(1, 16, 512, 4, 3, 1), _cfg(1, 8, 1024, 4, 3, 1), _cfg(1, 32, 256, 4, 3, 1), _cfg(1, 16, 256, 4, 3, 2),
        _cfg(1, 64, 128, 4, 3, 4), _cfg(1, 4, 1024, 2, 3, 1), _cfg(1, 32, 512, 8, 3, 1),
        _cfg(16, 16, 512, 4, 3, 1), _cfg(16, 32, 256, 4, 3, 1), _cfg(16, 32, 128, 4, 4, 1),
        _cfg(16, 64, 128, 4, 3, 2), _cfg(16, 16, 256, 4, 3, 2), _cfg(16, 16, 1024, 4, 2, 1), _cfg(16, 64, 256, 4, 3, 1),
    ]
    _GEMM_CONFIGS = [
        _cfg(64, 16, 256, 4, 3), _cfg(64, 32, 128, 4, 4), _cfg(64, 32, 256, 4, 3), _cfg(64, 64, 128, 4, 4),
        _cfg(32, 64, 128, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 128, 8, 3),
    ]


def _quick_bench(kernel_call, quantiles):
    """Autotuning's timer: short, since tuning runs once per shape and GPU, on the first call."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _prune(configs, named_args, **kwargs):
    """Keep tiles that suit M and split K into whole groups; the interpreter takes the first one."""
    args = {**named_args, **kwargs}
    m, k, g = args["M_BUCKET"], args["K"], args["GROUP_SIZE"]
    fitting = [
        c for c in configs
        if k % c.kwargs["BLOCK_K"] == 0
        and (c.kwargs["BLOCK_K"] % g == 0 or g % c.kwargs["BLOCK_K"] == 0)
        and (c.kwargs["BLOCK_M"] == 1) == (m == 1)
        and c.kwargs["BLOCK_M"] <= max(m, 64)
    ]
    assert fitting, f"no {'gemv' if m <= DECODE_MAX_M else 'gemm'} tile fits K={k}, group_size={g}"
    return fitting[:1] if _INTERPRET else fitting


@triton.jit
def _dequant_tile(
    qw_ptr, s_ptr, z_ptr,  # qw: [N, K // 2] or [N, K] uint8; s, z: [N, K // GROUP_SIZE]
    rows,  # [BLOCK_N] weight rows, in bounds
    k0,  # first column of the tile, a multiple of BLOCK_K
    stride_qn, stride_sn,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """-> W[rows, k0:k0 + BLOCK_K]: [BLOCK_N, BLOCK_K], bit-identical to the reference's (q - z) * s.

    Computed in fp32 and rounded once to the scales' dtype: q - z is an exact small integer and its
    product with a 16-bit scale is exact in fp32, so that one rounding is the reference's rounding.
    q becomes fp32 without a conversion instruction (those run at 1/8 rate): the bits
    0x4B000000 | q are the float 2**23 + q, and subtracting 2**23 + z leaves q - z exactly.
    """
    BLOCK_N: tl.constexpr = rows.shape[0]
    if BITS <= 4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = tl.load(qw_ptr + rows[:, None] * stride_qn + offs_b[None, :])  # [BLOCK_N, BLOCK_K // 2]
        q = tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_N, BLOCK_K))  # even k: low nibble, odd k: high
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(qw_ptr + rows[:, None] * stride_qn + offs_k[None, :])  # [BLOCK_N, BLOCK_K]
    q = (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + q
    if BLOCK_K <= GROUP_SIZE:  # one group per row of the tile
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + rows * stride_sn + g)  # [BLOCK_N]
        z = tl.load(z_ptr + rows * stride_sn + g).to(tl.float32) + 8388608.0  # 2**23 + z
        w = ((q - z[:, None]) * s.to(tl.float32)[:, None]).to(s.dtype)
    else:  # BLOCK_K // GROUP_SIZE groups per row
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE
        g = k0 // GROUP_SIZE + tl.arange(0, NG)
        s = tl.load(s_ptr + rows[:, None] * stride_sn + g[None, :])  # [BLOCK_N, NG]
        z = tl.load(z_ptr + rows[:, None] * stride_sn + g[None, :]).to(tl.float32) + 8388608.0
        q3 = tl.reshape(q, (BLOCK_N, NG, GROUP_SIZE))
        w = tl.reshape(((q3 - z[:, :, None]) * s.to(tl.float32)[:, :, None]).to(s.dtype), (BLOCK_N, BLOCK_K))
    return w.to(OUT_DTYPE)


@triton.autotune(
    configs=_GEMV_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"], prune_configs_by={"early_config_prune": _prune},
    do_bench=_quick_bench,
)
@triton.jit
def _wq_gemv_kernel(
    # tensors
    x_ptr,  # x: [M, K], M <= 16
    qw_ptr, s_ptr, z_ptr,  # the quantized weight (see _dequant_tile)
    bias_ptr,  # bias: [N], read if HAS_BIAS
    y_ptr,  # y: [M, N]
    ws_ptr,  # ws: [SPLIT_K, BLOCK_M, N] fp32 partial sums (SPLIT_K > 1)
    count_ptr,  # count: [cdiv(N, BLOCK_N)] int32, zero between calls (SPLIT_K > 1)
    # sizes and strides (inner strides are 1)
    M, N, K,
    M_BUCKET,  # autotuning key only
    stride_xm, stride_qn, stride_sn, stride_ym,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_n % N  # wrapped so loads stay in bounds; stores are masked
    x_rows = x_ptr + (offs_m % M)[:, None] * stride_xm  # [BLOCK_M, 1]
    num_kb = K // BLOCK_K
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_end = min(num_kb, (pid_k + 1) * kb_per_split)

    if BLOCK_M == 1:  # GEMV: products on CUDA cores, one reduction at the end
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for kb in range(pid_k * kb_per_split, kb_end):
            w = _dequant_tile(qw_ptr, s_ptr, z_ptr, rows, kb * BLOCK_K, stride_qn, stride_sn,
                              GROUP_SIZE, BITS, BLOCK_K, x_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_K]
            x = tl.load(x_rows + kb * BLOCK_K + offs_k[None, :])  # [1, BLOCK_K]
            acc2 += w.to(tl.float32) * x.to(tl.float32)
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BLOCK_N]
    else:  # 2..16 rows: a 16-row tensor-core dot, rows past M are copies that the store drops
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(pid_k * kb_per_split, kb_end):
            w = _dequant_tile(qw_ptr, s_ptr, z_ptr, rows, kb * BLOCK_K, stride_qn, stride_sn,
                              GROUP_SIZE, BITS, BLOCK_K, x_ptr.dtype.element_ty)
            x = tl.load(x_rows + kb * BLOCK_K + offs_k[None, :])  # [BLOCK_M, BLOCK_K]
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:  # publish the partial sum; the last split of this column tile reduces them all
        ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]  # [BLOCK_M, BLOCK_N]
        tl.store(ws_tile + pid_k * BLOCK_M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(ws_tile + s * BLOCK_M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid_n, 0)  # zero again for the next call
            _store_output(y_ptr, bias_ptr, acc, offs_m, offs_n, rows, mask, stride_ym, HAS_BIAS)
    else:
        _store_output(y_ptr, bias_ptr, acc, offs_m, offs_n, rows, mask, stride_ym, HAS_BIAS)


@triton.jit
def _store_output(y_ptr, bias_ptr, acc, offs_m, offs_n, cols, mask, stride_ym, HAS_BIAS: tl.constexpr):
    """acc: [BLOCK_M, BLOCK_N] fp32 (+ bias, in fp32 as a GEMM epilogue does) -> y, cast once."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"], prune_configs_by={"early_config_prune": _prune},
    do_bench=_quick_bench,
)
@triton.jit
def _wq_gemm_kernel(
    # tensors
    x_ptr,  # x: [M, K]
    qw_ptr, s_ptr, z_ptr,  # the quantized weight (see _dequant_tile)
    bias_ptr,  # bias: [N], read if HAS_BIAS
    y_ptr,  # y: [M, N]
    # sizes and strides (inner strides are 1)
    M, N, K,
    M_BUCKET,  # autotuning key only
    stride_xm, stride_qn, stride_sn, stride_ym,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # column tiles outer, row tiles inner: the programs that share a weight tile run together
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_n % N  # wrapped so loads stay in bounds; stores are masked
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, rows, k0, stride_qn, stride_sn,
                          GROUP_SIZE, BITS, BLOCK_K, x_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(tl.load(x_ptrs), tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    _store_output(y_ptr, bias_ptr, acc, offs_m, offs_n, rows, mask, stride_ym, HAS_BIAS)


_counters = {}  # device -> int32 split-K arrival counters, all zero between launches


def _split_k_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    buf = _counters.get(device)
    if buf is None or buf.numel() < n_tiles:
        buf = torch.zeros(max(n_tiles, 1024), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def linear_wq(
    x: torch.Tensor,  # [..., K] fp16/bf16/fp32
    qweight: torch.Tensor,  # [N, K // 2] (bits <= 4) or [N, K] (bits == 8) uint8
    scales: torch.Tensor,  # [N, K // G]
    zeros: torch.Tensor,  # [N, K // G]
    bias: Optional[torch.Tensor],  # [N] or None
    group_size: int,
    bits: int,
) -> torch.Tensor:
    """Same function as `torch.ops.llmopt.linear_wq`, one Triton launch (GEMV for M <= 16, else GEMM)."""
    assert bits in (3, 4, 8), f"bits={bits}: 3/4-bit (4-bit slots) and 8-bit are supported"
    lead, k = x.shape[:-1], x.shape[-1]
    n = qweight.shape[0]
    assert qweight.dtype == torch.uint8 and qweight.shape[1] == (k // 2 if bits <= 4 else k)
    assert scales.shape == zeros.shape == (n, k // group_size) and k % group_size == 0
    assert group_size >= 16 and group_size & (group_size - 1) == 0, "group_size: a power of two >= 16"
    x2 = x.reshape(-1, k).contiguous()  # x2: [M, K]
    m = x2.shape[0]
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.to(scales.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # y: [M, N]
    if m == 0:
        return y.reshape(*lead, n)
    common = dict(
        GROUP_SIZE=group_size, BITS=bits, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    b = bias if bias is not None else scales
    if m <= DECODE_MAX_M:
        ws = torch.empty(_MAX_SPLIT_K, DECODE_MAX_M, n, dtype=torch.float32, device=x.device)  # ws: [S, 16, N]
        counters = _split_k_counters(x.device, triton.cdiv(n, 8))
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        _wq_gemv_kernel[grid](
            x2, qweight, scales, zeros, b, y, ws, counters, m, n, k, triton.next_power_of_2(m),
            x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0), **common,
        )
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _wq_gemm_kernel[grid](
            x2, qweight, scales, zeros, b, y, m, n, k, min(triton.next_power_of_2(m), 4096),
            x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0), **common,
        )
    return y.reshape(*lead, n)
