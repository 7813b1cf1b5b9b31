"""Weight-only 4-bit linear for small batches (17 <= M <= 128) on Hopper in Gluon: wgmma with the weights in registers.

Entry points: `linear_w4_wgmma(x [M, K] bf16/fp16, qweight [N, K // 2] uint8, scales [N, K // G], zeros, bias,
group_size, split_k=None) -> y [M, N]`, and `choose(x, qweight, group_size, bits) -> split_k | None`, which
`linear_wq` asks first: None means "not this kernel" (not sm_90, another dtype or width, M out of range, misaligned
operands, or this kernel failed its one-time check on this Triton). Same function as `torch.ops.llmopt.linear_wq`
up to the order of fp32 sums: each weight is dequantized to the reference's 16-bit value exactly, (q - z) * s
rounded once (the magic-number float MAGIC + q minus MAGIC + z is q - z exactly; one `sub` and one `mul` per two
weights).

Why a third kernel: at M = 17 to 128 a W4A16 linear still streams mostly weight bytes, but its products no longer
fit `mma.sync` on x rows held in registers (`w4a16_direct.py`), and the Triton kernel builds its weight tile
through shared memory. Here one warpgroup computes a yᵀ tile [64, BM] (BM = M rounded up to a power of two) with
`wgmma`: A, the weights, comes from registers, each thread loading 16 contiguous bytes of two weight rows a 128-k
block straight into its A fragment (the relabelling of k that `w4a16_direct.py` explains; wgmma's register A
fragment is mma.sync's, warp w holding rows 16w .. 16w + 15); B, xᵀ, comes from shared memory, where the program
stores each block of x in that same logical order of k (one `prmt` per two values on the way), so the weights never
touch shared memory and one barrier a block orders the x stores before the wgmma that reads them. Split-K over
programs (the last to arrive sums the fp32 partials, as `w4a16_gemm.py` does) fills the GPU.

Measured on the H100 (benchmarks/RESULTS.md, `python -m benchmarks.bench_w4_kernels wgmma`): 1.07-1.55x what
`linear_wq` ran before at M = 32 to 128 (the Triton kernel to 64, dequantize + cuBLAS above), no faster than the
Triton kernel at M = 16, hence M >= 17. Still slower than bf16 at M = 128: staging x costs each thread BM / 2
stores a block, and the warpgroup waits for each wgmma.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from llmopt.codegen.kernels.split_k import arrival_counters
from llmopt.codegen.kernels.w4a16_direct import _W_ASM_BF16, _W_ASM_FP16, _X_ASM
from llmopt.codegen.kernels.w4a16_first_use import TILE_K, fastest_streaming, first_use_config, matches_reference

BLOCK_K = gl.constexpr(TILE_K)
_cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier  # renamed after Triton 3.6
MIN_M, MAX_M = 17, 128  # below: the Triton kernel and w4a16_direct.py; above: dequantize + cuBLAS
# two weights MAGIC + q, two MAGIC + z, two scales -> two (q - z) * s: the sub is exact, the mul rounds once
_SCALE_ASM_BF16 = gl.constexpr("sub.bf16x2 $0, $1, $2; mul.bf16x2 $0, $0, $3;")
_SCALE_ASM_FP16 = gl.constexpr("sub.f16x2 $0, $1, $2; mul.f16x2 $0, $0, $3;")


@gluon.constexpr_function
def _word_layout() -> gl.DistributedLinearLayout:
    """[64, 16] int32 weight words of one 128-k block: a thread holds 4 contiguous words (16 bytes) of rows g and
    g + 8 of its warp's 16 rows (g = lane // 4), at word 4c (c = lane % 4)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]], lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 16])


@gluon.jit
def _dequantize(words, dtype: gl.constexpr):
    """words: [BN, 16] int32 -> [BN, 128] MAGIC + q in dtype, logical k = e + 2c + 8p + 32j (w4a16_direct.py)."""
    if dtype == gl.bfloat16:
        asm: gl.constexpr = _W_ASM_BF16
    else:
        asm: gl.constexpr = _W_ASM_FP16
    BN: gl.constexpr = words.shape[0]
    lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [words], dtype=(gl.int16, gl.int16),
                                      is_pure=True, pack=1)
    halves = gl.reshape(gl.join(lo, hi), [BN, 32])
    p = gl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r", [halves], dtype=(gl.int16, ) * 4, is_pure=True, pack=2)
    shape: gl.constexpr = [BN, 4, 4, 2]  # c, j (word 4c + j), e (its half)
    t = gl.join(gl.join(gl.reshape(p[0], shape), gl.reshape(p[1], shape)),
                gl.join(gl.reshape(p[2], shape), gl.reshape(p[3], shape)))  # [BN, c, j, e, p0, p1]
    t = gl.permute(t, (0, 2, 5, 4, 1, 3))  # [BN, j, p1, p0, c, e]
    return gl.reshape(t, [BN, BLOCK_K]).to(dtype, bitcast=True)


@gluon.jit
def _x_logical(xw, dtype: gl.constexpr):
    """xw: [BM, 64] int32 x words of one block (word 16c + 4j + 2e + h holds physical k 32c + 8j + 4e + 2h + b,
    b = 0, 1) -> [BM, 128] in dtype, in the weights' logical order of k (p = 2h + b)."""
    BM: gl.constexpr = xw.shape[0]
    lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [xw], dtype=(gl.int16, gl.int16),
                                      is_pure=True, pack=1)
    t = gl.reshape(gl.join(lo, hi), [BM, 4, 4, 2, 2, 2])  # c, j, e, h, b
    a, b = gl.split(gl.permute(t, (0, 1, 2, 4, 5, 3)))  # e = 0 and e = 1: [BM, c, j, h, b]
    lo, hi = gl.inline_asm_elementwise(_X_ASM, "=r,=r,r,r", [a, b], dtype=(gl.int16, ) * 2, is_pure=True, pack=2)
    t = gl.join(lo, hi)  # [BM, c, j, h, e, p0]
    t = gl.permute(t, (0, 2, 3, 5, 1, 4))  # [BM, j, h (p1), p0, c, e]
    return gl.reshape(t, [BM, BLOCK_K]).to(dtype, bitcast=True)


@gluon.jit
def _weights(kb, w_ptrs, s_ptrs, z_ptrs, kb_end, num_kb, GROUP_SIZE: gl.constexpr):
    """Block kb's weight words [BN, 16] int32, zero points and scales [BN] (past kb_end: the last block again, with
    scale 0, so it adds nothing)."""
    kb_c = gl.minimum(kb, num_kb - 1)
    words = gl.load(w_ptrs + kb_c * (BLOCK_K // 8))
    g = kb_c * BLOCK_K // GROUP_SIZE
    z = gl.load(z_ptrs + g)
    s = gl.load(s_ptrs + g, mask=kb < kb_end, other=0.0)
    return words, z, s


@gluon.jit
def _operand(block, a_layout: gl.constexpr, magic: gl.constexpr):
    """_weights' tuple -> the A operand [BN, 128]: (q - z) * s in 16 bits, the reference's dequantized weight."""
    words, z, s = block
    dtype: gl.constexpr = s.dtype
    if dtype == gl.bfloat16:
        asm: gl.constexpr = _SCALE_ASM_BF16
    else:
        asm: gl.constexpr = _SCALE_ASM_FP16
    w = gl.convert_layout(_dequantize(words, dtype), a_layout, assert_trivial=True)  # MAGIC + q
    # one sub and one mul per two weights (the compiler emits them one weight at a time)
    return gl.inline_asm_elementwise(asm, "=r,r,r,r", [w, (z + magic)[:, None], s[:, None]], dtype=w.dtype,
                                     is_pure=True, pack=2)


@gluon.jit
def _w4_wgmma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, M, N, num_kb, stride_xm,
                     stride_qn, stride_sn, stride_ym, GROUP_SIZE: gl.constexpr, BM: gl.constexpr,
                     SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr):
    NW: gl.constexpr = 4  # one warpgroup
    BN: gl.constexpr = 64
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    magic: gl.constexpr = 128.0 if dtype == gl.bfloat16 else 1024.0
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                         instr_shape=[16, BM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, a_layout)  # [BN]
    w_layout: gl.constexpr = _word_layout()
    x_layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [NW, 1], [1, 0])  # [BM, 64] words, 16 bytes a thread
    x_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    pid = gl.program_id(0)
    num_m = gl.cdiv(M, BM)
    row0 = (pid // num_m) * BN
    m0 = (pid % num_m) * BM
    blocks_per_split = gl.cdiv(num_kb, SPLIT_K)
    kb0 = gl.program_id(1) * blocks_per_split
    kb_end = gl.minimum(num_kb, kb0 + blocks_per_split)

    # weight words [BN, 16], scales and zero points [BN] of block 0; rows past N read row N - 1 (not stored)
    rows = gl.minimum(row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, w_layout)), N - 1)
    w_ptrs = (qw_ptr.to(gl.pointer_type(gl.int32)) + rows[:, None] * (stride_qn // 4)
              + gl.arange(0, 16, layout=gl.SliceLayout(0, w_layout))[None, :])
    s_rows = gl.minimum(row0 + gl.arange(0, BN, layout=row_layout), N - 1)
    s_ptrs = s_ptr + s_rows * stride_sn
    z_ptrs = z_ptr + s_rows * stride_sn
    # x words [BM, 64] of block 0; rows past M read row M - 1 (not stored)
    xm = gl.minimum(m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, x_layout)), M - 1)
    x_ptrs = (x_ptr.to(gl.pointer_type(gl.int32)) + xm[:, None] * (stride_xm // 2)
              + gl.arange(0, 64, layout=gl.SliceLayout(0, x_layout))[None, :])
    xs0 = gl.allocate_shared_memory(dtype, [BM, BLOCK_K], x_smem_layout)
    xs1 = gl.allocate_shared_memory(dtype, [BM, BLOCK_K], x_smem_layout)

    acc = gl.zeros([BN, BM], gl.float32, acc_layout)  # yᵀ partial sums
    # two blocks of weight registers in flight, each reloaded right after use; x a block ahead (it comes from L2);
    # the loop is unrolled twice, one x buffer a half; blocks past kb_end add 0. The wgmma waits for its result
    # (measured: an asynchronous one, which keeps the last A operand alive, needs 255 registers and was no faster)
    w_args = (w_ptrs, s_ptrs, z_ptrs, kb_end, num_kb, GROUP_SIZE)
    buf0 = _weights(kb0, *w_args)
    buf1 = _weights(kb0 + 1, *w_args)
    xw = gl.load(x_ptrs + gl.minimum(kb0, num_kb - 1) * (BLOCK_K // 2))
    for kb in range(kb0, kb_end, 2):
        xs0.store(_x_logical(xw, dtype))
        xw = gl.load(x_ptrs + gl.minimum(kb + 1, num_kb - 1) * (BLOCK_K // 2))
        fence_async_shared()
        _cta_barrier()  # every warp's x stores land before the wgmma reads them
        a = _operand(buf0, a_layout, magic)
        buf0 = _weights(kb + 2, *w_args)
        acc = warpgroup_mma(a, xs0.permute((1, 0)), acc)
        xs1.store(_x_logical(xw, dtype))
        xw = gl.load(x_ptrs + gl.minimum(kb + 2, num_kb - 1) * (BLOCK_K // 2))
        fence_async_shared()
        _cta_barrier()
        a = _operand(buf1, a_layout, magic)
        buf1 = _weights(kb + 3, *w_args)
        acc = warpgroup_mma(a, xs1.permute((1, 0)), acc)

    offs_n = row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, acc_layout))
    offs_m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, acc_layout))
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)  # [BN, BM]
    if SPLIT_K > 1:  # publish the partial sum; the last split of this output tile reduces them all
        ws_tile = ws_ptr + offs_m[None, :] * N + offs_n[:, None]  # [BN, BM]
        gl.store(ws_tile + gl.program_id(1) * M * N, acc, mask=mask)
        _cta_barrier()  # every thread's partial is written before the counter moves
        arrived = gl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = gl.zeros([BN, BM], gl.float32, acc_layout)
            for sk in range(SPLIT_K):
                acc += gl.load(ws_tile + sk * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            gl.atomic_xchg(count_ptr + pid, 0)  # zero again for the next call
            _store(y_ptr, b_ptr, acc, offs_m, offs_n, N, mask, stride_ym, HAS_BIAS)
    else:
        _store(y_ptr, b_ptr, acc, offs_m, offs_n, N, mask, stride_ym, HAS_BIAS)


@gluon.jit
def _store(y_ptr, b_ptr, acc, offs_m, offs_n, N, mask, stride_ym, HAS_BIAS: gl.constexpr):
    """acc [BN, BM] fp32 yᵀ (+ bias in fp32) -> y [M, N], cast once."""
    if HAS_BIAS:
        acc += gl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[:, None]
    gl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


CONFIGS = [2, 4, 8]  # SPLIT_K: the programs an output tile's K is split over (1 and 16 never won on the H100)
_checked = {}  # (device index, dtype) -> whether the kernel matched the reference on a small odd case
_tuned = {}  # (device index, dtype, M bucket, N, K, G) -> the fastest of CONFIGS


def tile_m(m: int) -> int:
    """The x rows a program takes (wgmma's n): M rounded up to a power of two, 16 to 128."""
    return min(max(triton.next_power_of_2(m), 16), MAX_M)


def choose(x: torch.Tensor, qweight: torch.Tensor, group_size: int, bits: int):
    """x: [M, K] contiguous, qweight: [N, K // 2] contiguous -> the split_k to run this kernel with, or None for
    linear_wq's other paths. The first call per device and dtype checks the kernel against the reference (a failure
    to compile or a wrong result warns and turns it off); the first call per shape times CONFIGS and keeps the
    fastest (`w4a16_first_use.py`)."""
    return first_use_config(x, qweight, group_size, bits, range(MIN_M, MAX_M + 1), _checked, _tuned,
                            _matches_reference, lambda *shape: fastest_streaming(linear_w4_wgmma, CONFIGS, *shape))


def _matches_reference(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernel on a small odd case (partial tiles, 37 rows of x, groups of 256, bias, split K) against the
    reference."""
    return matches_reference(lambda *args: linear_w4_wgmma(*args, 2), "wgmma W4A16 kernel",
                             "using linear_wq's other paths instead", 37, 200, 1280, 256, device, dtype)


def linear_w4_wgmma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias,
                    group_size: int, split_k=None) -> torch.Tensor:
    """x [M, K] (16-bit, contiguous), qweight [N, K // 2] uint8 (contiguous), scales/zeros [N, K // G], bias [N] or
    None -> y [M, N]. split_k: CONFIGS[0] when None."""
    m, k = x.shape
    n = qweight.shape[0]
    scales = scales.contiguous()
    zeros = zeros.to(scales.dtype).contiguous()
    split_k = split_k or CONFIGS[0]
    bm = tile_m(m)
    n_tiles = triton.cdiv(n, 64) * triton.cdiv(m, bm)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # y: [M, N]
    ws = torch.empty(split_k if split_k > 1 else 0, m, n, dtype=torch.float32, device=x.device)  # ws: [S, M, N]
    counters = arrival_counters(x.device, n_tiles)
    _w4_wgmma_kernel[(n_tiles, split_k)](
        x, qweight, scales, zeros, bias if bias is not None else scales, y, ws, counters,
        m, n, k // TILE_K, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, BM=bm, SPLIT_K=split_k, HAS_BIAS=bias is not None, num_warps=4,
    )
    return y
