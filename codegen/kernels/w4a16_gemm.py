"""Weight-only group-quantized linear (W4/W3/W8, A16/A32) in Triton, reading the canonical layout.

Entry point: `linear_wq(x, qweight, scales, zeros, bias, group_size, bits)`, the same function as
`torch.ops.llmopt.linear_wq` up to fp32 rounding (see below). On sm_90, 16-bit x against 4-bit weights in groups of
>= 128 runs a Gluon kernel at up to 16 rows (`w4a16_direct.py`, 1.19-1.64x this module's at 1 to 8 rows on the
H100, session 27; at 9 to 16 only for the shapes where first-use tuning timed it faster) and at 17 to 128 rows
(`w4a16_wgmma.py`, 1.07-1.55x what ran there before); else, up to FUSED_MAX_M rows it runs the fused kernel below;
above, it dequantizes the weight into a temporary (`dequantize_wq.py`) and calls `torch.nn.functional.linear`, as
the reference does, so the result is the reference's exactly: on the H200 that was 1.06-2.46x faster than the fused
kernel at M = 128 to 4096 (benchmarks/RESULTS.md). The weight is read as stored
(`llmopt/ops/linear_wq.py`): uint8 `[N, K // 2]` with the even k in the low nibble (3-bit values
sit in 4-bit slots), or uint8 `[N, K]` for 8 bits; there is no repacking step.

One kernel, `_wq_kernel`, computes a tile yᵀ `[BLOCK_N, BLOCK_M]` = W · xᵀ on tensor cores (wgmma
on Hopper) with the weight tile as the left operand, built in registers (M is padded to 16 rows
when smaller). K runs in blocks of BLOCK_K = min(group_size, 128), so a block lies in one group.

No nibble interleaving: both operands are read as words of P values (4-bit weights and 16-bit x:
P = 4, an int16 of four nibbles against an int64 of four x values; P = 2 for fp32 x or 32-wide
groups; P = 1 for 8-bit weights). Plane r of a block's words holds k = k0 + P * i + r, for the
weight and for x alike; the planes are laid side by side along the dot's K (a relabelling of
registers, no data movement), and since a dot's sum does not depend on the order of k, one dot
per block covers them all.

Per weight there is no int-to-float conversion: one shift and one lop3 per register of two int16
words (inline PTX; plain Triton under the interpreter) give the bits MAGIC | q, the bf16 128 + q
or fp16 1024 + q (fp32: 0x4B000000 | q = 2**23 + q). Zero point and scale, per block (BIAS = that
offset):
- SCALE_IN_TILE=False: y += s * (Σ (BIAS + q) x - (BIAS + z) Σ x) in fp32, so the tile is the raw
  magic numbers (the fp32 path, whose BIAS is too large to cancel, subtracts BIAS + z in the tile);
- SCALE_IN_TILE=True: W = (q - z) * s rounded to the scales' dtype, bit-identical to the
  reference's dequantization, one accumulator across blocks.
x and scales (zeros too, when they leave the tile) are loaded an iteration ahead; the weight tiles
are pipelined by the compiler (cp.async, num_stages deep); SUB = 2 takes two blocks per iteration.
Split-K (SPLIT_K > 1): the last program of an output tile (an atomic counter that resets
itself) sums the fp32 partials, all loads at once (unrolled), so a call is a single launch. Two autotuners share
the kernel: `_wq_gemv_kernel` for M <= 16 and `_wq_gemm_kernel` for 16 < M <= FUSED_MAX_M, keyed on (M bucket,
N, K, group size) and the GPU; they choose among these variants per shape.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from llmopt.codegen.kernels.dequantize_wq import dequantize_wq
from llmopt.codegen.kernels.split_k import sum_of_splits, tile_counters
from llmopt.codegen.kernels.tuning import quick_bench

try:  # Gluon's mma_v2, wgmma and linear layouts: Triton >= 3.6
    from llmopt.codegen.kernels import w4a16_direct, w4a16_wgmma
except ImportError:
    w4a16_direct = w4a16_wgmma = None

_INTERPRET = triton.knobs.runtime.interpret
DECODE_MAX_M = 16
FUSED_MAX_M = 64  # above: dequantize, then cuBLAS (the fused kernel was slower from M = 128 on)


def _cfg(bm, bn, warps, stages, split_k=1, sub=1, scale_in_tile=False):
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split_k, "SUB": sub, "SCALE_IN_TILE": scale_in_tile}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


if _INTERPRET:  # small tiles: the interpreter runs each program in Python and cannot time configs
    _DECODE_CONFIGS = [_cfg(16, 32, 4, 1, 2, 2), _cfg(16, 32, 4, 1, 2)]
    _GEMM_CONFIGS = [_cfg(32, 32, 4, 1, 2, 2, True), _cfg(32, 32, 4, 1, 2), _cfg(64, 32, 4, 1, 1)]
else:  # (BLOCK_M, BLOCK_N, warps, stages, SPLIT_K, SUB, SCALE_IN_TILE)
    _DECODE_CONFIGS = [  # 3 stages: the best M=1 configs of a sweep on the H200 (2-4% over 4; 6 and 8 slower)
        _cfg(16, 128, 4, 3, 8), _cfg(16, 128, 4, 3, 4), _cfg(16, 64, 4, 3, 8),
        _cfg(16, 64, 4, 4, 4, 2), _cfg(16, 64, 4, 4, 8), _cfg(16, 64, 4, 4, 8, 2), _cfg(16, 64, 4, 4, 16),
        _cfg(16, 128, 4, 4, 2, 2), _cfg(16, 128, 4, 4, 4), _cfg(16, 128, 4, 4, 4, 2), _cfg(16, 128, 4, 4, 8),
        _cfg(16, 128, 8, 4, 4), _cfg(16, 128, 8, 4, 4, 2), _cfg(16, 256, 8, 3, 4),
        _cfg(16, 64, 4, 4, 8, 1, True), _cfg(16, 128, 4, 4, 4, 1, True),
    ]
    _GEMM_CONFIGS = [
        _cfg(32, 128, 4, 4, 2), _cfg(32, 128, 4, 4, 4), _cfg(64, 64, 4, 4, 4), _cfg(64, 128, 8, 4, 1),
        _cfg(64, 128, 8, 4, 2), _cfg(64, 128, 8, 4, 4), _cfg(64, 128, 8, 4, 2, 2), _cfg(64, 128, 8, 4, 4, 2),
        _cfg(64, 128, 4, 4, 2, 1, True), _cfg(64, 128, 4, 4, 4, 1, True), _cfg(64, 256, 8, 3, 1, 1, True),
    ]


def _prune(configs, named_args, **kwargs):
    """Tiles no taller than M needs; two blocks per iteration only where the number of blocks is even."""
    args = {**named_args, **kwargs}
    m, num_kb = args["M_BUCKET"], args["K"] // args["BLOCK_K"]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(m, 32) and num_kb % c.kwargs["SUB"] == 0]
    assert fitting, f"no tile fits M bucket {m}, {num_kb} blocks"
    return fitting[:1] if _INTERPRET else fitting


@triton.jit
def _plane(wq, SHIFT: tl.constexpr, SLOT: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """wq: [BLOCK_N, KK] words -> the bits of a float that holds q = (wq >> SHIFT) & (2**SLOT - 1).

    MAGIC > 0 (16-bit dtypes): int16 MAGIC | q, the number BIAS + q (bf16 0x4300 = 128 for
    q < 128, fp16 0x6400 = 1024: q lands in the mantissa); MAGIC == 0: int32 0x4B000000 | q, the
    fp32 2**23 + q. So q needs no int-to-float conversion instruction. ASM (int16 words): one
    shift and one lop3 per register, which holds two words (LLVM would split the 16-bit shifts).
    """
    if ASM:
        bits = tl.inline_asm_elementwise(
            asm=f"{{ .reg .b32 t; shr.b32 t, $1, {SHIFT}; lop3.b32 $0, t, 0x000F000F, {MAGIC * 0x10001}, 0xea; }}",
            constraints="=r,r", args=[wq], dtype=tl.int16, is_pure=True, pack=2,
        )
    elif MAGIC > 0:
        bits = ((wq >> SHIFT) & (2**SLOT - 1)).to(tl.int16) | MAGIC
    else:
        bits = ((wq >> SHIFT) & (2**SLOT - 1)).to(tl.int32) | 0x4B000000
    return bits


@triton.jit
def _dequant(bits, z, s, BIAS: tl.constexpr, ZERO_IN_TILE: tl.constexpr, SCALE_IN_TILE: tl.constexpr,
             DTYPE: tl.constexpr):
    """bits: [BLOCK_N, KK] from _plane, the float BIAS + q; z, s: [BLOCK_N] zero points and scales.

    -> in DTYPE: BIAS + q (ZERO_IN_TILE False: the zero point is applied after the dot), q - z,
    or (SCALE_IN_TILE) (q - z) * s rounded to the scales' dtype, the reference's W: (BIAS + q) -
    (BIAS + z) is q - z, a small integer, exactly; its product with a 16-bit scale is exact in
    fp32, so one rounding to the scales' dtype is the reference's rounding.
    """
    if bits.dtype == tl.int16:
        w = bits.to(DTYPE, bitcast=True)
        if ZERO_IN_TILE:
            w = w - (z.to(DTYPE) + BIAS)[:, None]
    else:
        w = bits.to(tl.float32, bitcast=True) - (z.to(tl.float32) + BIAS)[:, None]
    if SCALE_IN_TILE:
        if s.dtype == w.dtype:  # one correctly rounded product
            w = w * s[:, None]
        else:
            w = (w.to(tl.float32) * s.to(tl.float32)[:, None]).to(s.dtype)
    return w.to(DTYPE)


@triton.jit
def _cat(a, b):
    """[R, C], [R, C] -> [R, 2C]: a's columns, then b's."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _block_operands(x_ptrs, s_ptrs, z_ptrs, kb, SUB: tl.constexpr, BLOCK_K: tl.constexpr, P: tl.constexpr,
                    GROUP_SIZE: tl.constexpr):
    """The x words, scales and zeros of blocks kb and kb + SUB - 1 (the same block when SUB == 1):
    x: [BLOCK_M, BLOCK_K // P] XWORD each, scales and zeros: [BLOCK_N] each."""
    x_0 = tl.load(x_ptrs + kb * (BLOCK_K // P))
    s_0 = tl.load(s_ptrs + kb * BLOCK_K // GROUP_SIZE)
    z_0 = tl.load(z_ptrs + kb * BLOCK_K // GROUP_SIZE)
    x_1 = tl.load(x_ptrs + (kb + SUB - 1) * (BLOCK_K // P))
    s_1 = tl.load(s_ptrs + (kb + SUB - 1) * BLOCK_K // GROUP_SIZE)
    z_1 = tl.load(z_ptrs + (kb + SUB - 1) * BLOCK_K // GROUP_SIZE)
    return x_0, s_0, z_0, x_1, s_1, z_1


@triton.jit
def _block(acc, wq, xw, s, z, DTYPE: tl.constexpr, P: tl.constexpr, SLOT: tl.constexpr, MAGIC: tl.constexpr,
           BIAS: tl.constexpr, ASM: tl.constexpr, ZERO_IN_TILE: tl.constexpr, SCALE_IN_TILE: tl.constexpr,
           DOT_PRECISION: tl.constexpr):
    """acc: [BLOCK_N, BLOCK_M] fp32, plus one block: s * (W · xᵀ) with W = q - z.

    wq: [BLOCK_N, BLOCK_K // P] weight words, xw: [BLOCK_M, BLOCK_K // P] x words (P values each),
    s, z: [BLOCK_N]. Plane r of the words holds k = k0 + P * i + r; the planes are laid side by
    side (column r * BLOCK_K / P + i) in w and in x alike, so one dot sums over the whole block.
    """
    XBITS: tl.constexpr = DTYPE.primitive_bitwidth
    XVAL: tl.constexpr = tl.int16 if XBITS == 16 else tl.int32
    w = _dequant(_plane(wq, 0, SLOT, MAGIC, ASM), z, s, BIAS, ZERO_IN_TILE, SCALE_IN_TILE, DTYPE)
    xt = xw.to(XVAL).to(DTYPE, bitcast=True)
    if P >= 2:
        w1 = _dequant(_plane(wq, SLOT, SLOT, MAGIC, ASM), z, s, BIAS, ZERO_IN_TILE, SCALE_IN_TILE, DTYPE)
        w = _cat(w, w1)
        xt = _cat(xt, (xw >> XBITS).to(XVAL).to(DTYPE, bitcast=True))
    if P == 4:
        w2 = _dequant(_plane(wq, 2 * SLOT, SLOT, MAGIC, ASM), z, s, BIAS, ZERO_IN_TILE, SCALE_IN_TILE, DTYPE)
        w3 = _dequant(_plane(wq, 3 * SLOT, SLOT, MAGIC, ASM), z, s, BIAS, ZERO_IN_TILE, SCALE_IN_TILE, DTYPE)
        w = _cat(w, _cat(w2, w3))
        xt = _cat(xt, _cat((xw >> 2 * XBITS).to(XVAL).to(DTYPE, bitcast=True),
                           (xw >> 3 * XBITS).to(XVAL).to(DTYPE, bitcast=True)))
    # w: [BLOCK_N, BLOCK_K], xt: [BLOCK_M, BLOCK_K]
    if SCALE_IN_TILE:
        acc = tl.dot(w, tl.trans(xt), acc, input_precision=DOT_PRECISION)
    else:
        part = tl.dot(w, tl.trans(xt), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        if not ZERO_IN_TILE:  # Σ (BIAS + q) x - (BIAS + z) Σ x
            sx = tl.sum(xt.to(tl.float32), axis=1)  # [BLOCK_M]
            part -= (z.to(tl.float32) + BIAS)[:, None] * sx[None, :]
        acc += part * s.to(tl.float32)[:, None]
    return acc


@triton.jit
def _wq_kernel(
    # tensors
    x_ptr,  # x: [M, K]
    qw_ptr,  # qw: [N, K // 2] (BITS <= 4, low nibble = even k) or [N, K] (BITS == 8) uint8
    s_ptr, z_ptr,  # scales, zeros: [N, K // GROUP_SIZE]
    bias_ptr,  # bias: [N], read if HAS_BIAS
    y_ptr,  # y: [M, N]
    ws_ptr,  # ws: [SPLIT_K, M, N] fp32 partial sums (SPLIT_K > 1)
    count_ptr,  # count: [number of output tiles] int32, zero between calls (SPLIT_K > 1)
    # sizes and strides (inner strides are 1)
    M, N, K,
    M_BUCKET,  # autotuning key only
    stride_xm, stride_qn, stride_sn, stride_ym,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,  # min(GROUP_SIZE, 128): a block lies in one group
    FAST_UNPACK: tl.constexpr,  # inline PTX for the nibbles (not under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SUB: tl.constexpr,
    SCALE_IN_TILE: tl.constexpr,
):
    # output tiles: row tiles inner, so the programs that share a weight tile run together
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N  # weight rows, wrapped so loads stay in bounds; stores are masked
    m_rows = offs_m % M  # x rows, likewise (rows past M: copies)

    # words of P values (module docstring): weight words hold P nibbles (or one byte), x words P values
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    XBITS: tl.constexpr = DTYPE.primitive_bitwidth
    SLOT: tl.constexpr = 4 if BITS <= 4 else 8  # bits per stored value
    P: tl.constexpr = 1 if SLOT == 8 else (4 if XBITS == 16 and BLOCK_K >= 64 else 2)
    WORD: tl.constexpr = tl.uint8 if P * SLOT == 8 else tl.int16
    XWORD: tl.constexpr = tl.int16 if P * XBITS == 16 else (tl.int32 if P * XBITS == 32 else tl.int64)
    MAGIC: tl.constexpr = 0x6400 if DTYPE == tl.float16 else (0x4300 if DTYPE == tl.bfloat16 and SLOT == 4 else 0)
    BIAS: tl.constexpr = 8388608.0 if MAGIC == 0 else (1024.0 if DTYPE == tl.float16 else 128.0)
    ASM: tl.constexpr = FAST_UNPACK and WORD == tl.int16
    # the zero point: per weight in the tile, or (16-bit magic numbers, whose BIAS is small enough
    # for fp32 sums) once per block and output: Σ (BIAS + q) x - (BIAS + z) Σ x
    ZERO_IN_TILE: tl.constexpr = SCALE_IN_TILE or MAGIC == 0
    offs_i = tl.arange(0, BLOCK_K // P)
    w_ptrs = qw_ptr.to(tl.pointer_type(WORD)) + rows[:, None] * (stride_qn // (P * SLOT // 8)) + offs_i[None, :]
    x_ptrs = x_ptr.to(tl.pointer_type(XWORD)) + m_rows[:, None] * (stride_xm // P) + offs_i[None, :]
    s_ptrs = s_ptr + rows * stride_sn
    z_ptrs = z_ptr + rows * stride_sn

    # SUB blocks per iteration; split-K hands each program a run of iterations
    num_it = K // (SUB * BLOCK_K)
    it_per_split = tl.cdiv(num_it, SPLIT_K)
    it_begin = pid_k * it_per_split
    it_end = min(num_it, it_begin + it_per_split)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # yᵀ tile
    # x, scales and zeros are loaded an iteration ahead (the weight tiles are pipelined by the
    # compiler); under SUB == 1 the "_1" operands repeat block 0's
    x_0, s_0, z_0, x_1, s_1, z_1 = _block_operands(
        x_ptrs, s_ptrs, z_ptrs, min(it_begin, num_it - 1) * SUB, SUB, BLOCK_K, P, GROUP_SIZE)
    for it in range(it_begin, it_end):
        xw0, s0, z0, xw1, s1, z1 = x_0, s_0, z_0, x_1, s_1, z_1  # [BLOCK_M, BLOCK_K // P] XWORD, [BLOCK_N]
        kb = it * SUB
        x_0, s_0, z_0, x_1, s_1, z_1 = _block_operands(
            x_ptrs, s_ptrs, z_ptrs, min(it + 1, num_it - 1) * SUB, SUB, BLOCK_K, P, GROUP_SIZE)
        if ZERO_IN_TILE:  # loaded here: a zero point carried from the last iteration pins the tile's layout
            z0 = tl.load(z_ptrs + kb * BLOCK_K // GROUP_SIZE)
            z1 = tl.load(z_ptrs + (kb + SUB - 1) * BLOCK_K // GROUP_SIZE)
        wq = tl.load(w_ptrs + kb * (BLOCK_K // P))  # [BLOCK_N, BLOCK_K // P] WORD
        acc = _block(acc, wq, xw0, s0, z0,
                     DTYPE, P, SLOT, MAGIC, BIAS, ASM, ZERO_IN_TILE, SCALE_IN_TILE, DOT_PRECISION)
        if SUB == 2:
            wq = tl.load(w_ptrs + (kb + 1) * (BLOCK_K // P))
            acc = _block(acc, wq, xw1, s1, z1,
                         DTYPE, P, SLOT, MAGIC, BIAS, ASM, ZERO_IN_TILE, SCALE_IN_TILE, DOT_PRECISION)

    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)  # [BLOCK_N, BLOCK_M]
    if SPLIT_K > 1:  # the last split of this output tile to arrive sums the fp32 partials and stores
        ws_tile = ws_ptr + offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
        last, acc = sum_of_splits(acc, ws_tile, pid_k, M, N, count_ptr, pid, mask, SPLIT_K)
        if last:
            _store_output(y_ptr, bias_ptr, acc, offs_m, offs_n, rows, mask, stride_ym, HAS_BIAS)
    else:
        _store_output(y_ptr, bias_ptr, acc, offs_m, offs_n, rows, mask, stride_ym, HAS_BIAS)


@triton.jit
def _store_output(y_ptr, bias_ptr, acc, offs_m, offs_n, cols, mask, stride_ym, HAS_BIAS: tl.constexpr):
    """acc: [BLOCK_N, BLOCK_M] fp32 yᵀ (+ bias, in fp32 as a GEMM epilogue does) -> y, cast once."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


_AUTOTUNE = dict(key=["M_BUCKET", "N", "K", "GROUP_SIZE"], prune_configs_by={"early_config_prune": _prune},
                 do_bench=quick_bench, cache_results=True)
_wq_gemv_kernel = triton.autotune(configs=_DECODE_CONFIGS, **_AUTOTUNE)(_wq_kernel)  # M <= 16
_wq_gemm_kernel = triton.autotune(configs=_GEMM_CONFIGS, **_AUTOTUNE)(_wq_kernel)  # 16 < M <= FUSED_MAX_M
_MAX_SPLIT_K = {k: max(c.kwargs["SPLIT_K"] for c in k.configs) for k in (_wq_gemv_kernel, _wq_gemm_kernel)}


def supports(group_size: int, bits: int) -> bool:
    """Whether these kernels take linears of this format: 3/4/8 bits, groups a power of two >= 32 (a K block lies in
    one group). Lowering leaves the others on the reference op."""
    return bits in (3, 4, 8) and group_size >= 32 and group_size & (group_size - 1) == 0


def linear_wq(
    x: torch.Tensor,  # [..., K] fp16/bf16/fp32
    qweight: torch.Tensor,  # [N, K // 2] (bits <= 4) or [N, K] (bits == 8) uint8
    scales: torch.Tensor,  # [N, K // G]
    zeros: torch.Tensor,  # [N, K // G]
    bias: Optional[torch.Tensor],  # [N] or None
    group_size: int,
    bits: int,
) -> torch.Tensor:
    """Same function as `torch.ops.llmopt.linear_wq`: one Triton launch up to FUSED_MAX_M rows, else the
    reference's own computation on a weight dequantized in one Triton launch."""
    assert supports(group_size, bits), f"bits={bits}, group_size={group_size}: see supports()"
    lead, k = x.shape[:-1], x.shape[-1]
    n = qweight.shape[0]
    assert qweight.dtype == torch.uint8 and qweight.shape[1] == (k // 2 if bits <= 4 else k)
    assert scales.shape == zeros.shape == (n, k // group_size) and k % group_size == 0
    x2 = x.reshape(-1, k).contiguous()  # x2: [M, K]
    m = x2.shape[0]
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.to(scales.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    wgmma = None if w4a16_wgmma is None or _INTERPRET else w4a16_wgmma.choose(x2, qweight, group_size, bits)
    if wgmma is not None:  # 9 <= M <= 128 on sm_90: weights in registers as wgmma's A (w4a16_wgmma.py)
        y = w4a16_wgmma.linear_w4_wgmma(x2, qweight, scales, zeros, bias, group_size, wgmma)
        return y.reshape(*lead, n)
    if m > FUSED_MAX_M:
        w = dequantize_wq(qweight, scales, zeros, group_size, bits, x.dtype)  # w: [N, K]
        return torch.nn.functional.linear(x2, w, bias).reshape(*lead, n)
    direct = None if w4a16_direct is None or _INTERPRET else w4a16_direct.choose(x2, qweight, group_size, bits)
    if direct is not None:  # M <= 16 on sm_90: weights straight into mma registers (w4a16_direct.py)
        y = w4a16_direct.linear_w4_direct(x2, qweight, scales, zeros, bias, group_size, direct)
        return y.reshape(*lead, n)
    return linear_wq_triton(x2, qweight, scales, zeros, bias, group_size, bits).reshape(*lead, n)


def linear_wq_triton(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias,
                     group_size: int, bits: int) -> torch.Tensor:
    """The fused Triton kernel alone (what `linear_wq` runs up to FUSED_MAX_M rows where no Gluon kernel takes the
    call): x2 [M, K], qweight, scales, zeros and bias contiguous, zeros in the scales' dtype -> y [M, N]."""
    m, k = x2.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)  # y: [M, N]
    if m == 0:
        return y
    kernel = _wq_gemv_kernel if m <= DECODE_MAX_M else _wq_gemm_kernel
    ws = torch.empty(_MAX_SPLIT_K[kernel], m, n, dtype=torch.float32, device=x2.device)  # ws: [S, M, N]
    counters = tile_counters(x2.device, m, n)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else scales, y, ws, counters,
        m, n, k, triton.next_power_of_2(m),
        x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, BITS=bits, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", BLOCK_K=min(group_size, 128),
        FAST_UNPACK=not _INTERPRET,
    )
    return y
