"""Weight-only 4-bit linear for small batches (17 <= M <= 128) on Hopper in Gluon: wgmma with the weights in registers.

Entry points: `linear_w4_wgmma(x [M, K] bf16/fp16, qweight [N, K // 2] uint8, scales [N, K // G], zeros, bias,
group_size, config=None) -> y [M, N]`, and `choose(x, qweight, group_size, bits) -> config | None`, which
`linear_wq` asks first: None means "not this kernel" (not sm_90, another dtype or width, M out of range, misaligned
operands, or this kernel failed its one-time check on this Triton). Same function as `torch.ops.llmopt.linear_wq`
up to the order of fp32 sums: each weight is dequantized to the reference's 16-bit value exactly, (q - z) * s
rounded once (the magic-number float MAGIC + q minus MAGIC + z is q - z exactly; one `sub` and one `mul` per two
weights).

Why a third kernel: at M = 17 to 128 a W4A16 linear still streams mostly weight bytes, but its products no longer
fit `mma.sync` on x rows held in registers (`w4a16_direct.py`), and the Triton kernel builds its weight tile
through shared memory. Here one warpgroup computes a yᵀ tile [64, BM] (BM = M rounded up to a power of two) with
`wgmma`: A, the weights, comes from registers; B, xᵀ, from shared memory, where TMA puts each [BM, 128] block of x
(rows past M as zeros) in two rings of STAGES / 2 slots, one for even blocks and one for odd, each slot with its
mbarrier, so no thread touches x. Two rings because Triton's shared-memory barrier analysis works per allocation: a
step that touches only its own ring's slot and barrier needs 2 CTA barriers, not 3 (triton 3.6, sm_90 PTX).

How 16 contiguous bytes become wgmma's A fragment: each thread loads 16 contiguous bytes of two weight rows a 128-k
block (rows g and g + 8 of its warp's 16, g = lane // 4; quad position c = lane % 4 takes bytes 16c .. 16c + 15,
physical k 32c .. 32c + 31). The register A fragment (mma.sync's, k_width 2) wants a thread of quad position c to
hold the pairs at k = 2c (mod 8) of every group of 8, i.e. byte c of every 4-byte word of the row's block. Two
butterfly shuffle rounds inside the quad (lanes c ^ 2, then c ^ 1; `_TRANSPOSE_ASM`) transpose those bytes: 4
shuffles and 12 `prmt` a row and block, whatever M, where staging x through registers costs each thread BM / 2
stores a block. One `prmt` and one `lop3` then make each byte a float pair MAGIC + q (`_PAIR_ASM`), which is the A
fragment in physical order: `convert_layout(..., assert_trivial=True)` compiles to nothing.

Split-K over programs (the last to arrive sums the fp32 partials, as `w4a16_gemm.py` does) fills the GPU. The
wgmma either waits for its result before the next block, or (ASYNC) runs while the next block is dequantized.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from llmopt.codegen.kernels.split_k import arrival_counters
from llmopt.codegen.kernels.w4a16_direct import _nibble_pairs
from llmopt.codegen.kernels.w4a16_first_use import (TILE_K, choices_on_disk, fastest_streaming, first_use_config,
                                                     matches_reference)

BLOCK_K = gl.constexpr(TILE_K)
_cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier  # renamed after Triton 3.6
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared  # renamed after 3.6
_X_SMEM_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
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


# The lane quad's byte transpose. Before: the thread in quad position c holds words j = 0..3 with bytes
# B[c][j][b], byte 16c + 4j + b of its weight row (physical k 32c + 8j + 2b and + 1). After: word j holds bytes
# B[x][j][c], x = 0..3 (physical k 32x + 8j + 2c and + 1), which is where wgmma's A fragment wants a thread of quad
# position c: pairs at 2c (mod 8). Two butterfly rounds (lanes c ^ 2, then c ^ 1) each swap half of every word, two
# words a shuffle, one prmt packing what leaves and one a word merging what arrives.
_TRANSPOSE_ASM = gl.constexpr(" ".join([
    "{ .reg .b32 l, m, sp, s0, s1, r, a0, a1, a2, a3; .reg .pred p;", "mov.u32 l, %laneid;",
    "and.b32 m, l, 2; setp.ne.u32 p, m, 0;",
    "selp.b32 sp, 0x5410, 0x7632, p; selp.b32 s0, 0x3254, 0x5410, p; selp.b32 s1, 0x3276, 0x7610, p;",
    "prmt.b32 r, $4, $5, sp; shfl.sync.bfly.b32 r, r, 2, 0x1f, 0xffffffff;",
    "prmt.b32 a0, $4, r, s0; prmt.b32 a1, $5, r, s1;",
    "prmt.b32 r, $6, $7, sp; shfl.sync.bfly.b32 r, r, 2, 0x1f, 0xffffffff;",
    "prmt.b32 a2, $6, r, s0; prmt.b32 a3, $7, r, s1;",
    "and.b32 m, l, 1; setp.ne.u32 p, m, 0;",
    "selp.b32 sp, 0x6420, 0x7531, p; selp.b32 s0, 0x3514, 0x5240, p; selp.b32 s1, 0x3716, 0x7260, p;",
    "prmt.b32 r, a0, a1, sp; shfl.sync.bfly.b32 r, r, 1, 0x1f, 0xffffffff;",
    "prmt.b32 $0, a0, r, s0; prmt.b32 $1, a1, r, s1;",
    "prmt.b32 r, a2, a3, sp; shfl.sync.bfly.b32 r, r, 1, 0x1f, 0xffffffff;",
    "prmt.b32 $2, a2, r, s0; prmt.b32 $3, a3, r, s1; }"]))
# a transposed word -> 4 registers x of the float pair (MAGIC + low nibble, MAGIC + high nibble) of its byte x: one
# prmt puts byte x and byte x of the word shifted right by 4 in the two halves, one lop3 keeps a nibble each
_PAIR_ASM = " ".join(["{ .reg .b32 h, u; shr.b32 h, $4, 4;"] + [
    f"prmt.b32 u, $4, h, 0x{4 + x}{4 + x}{x}{x}; lop3.b32 ${x}, u, 0x000F000F, MAGIC, 0xea;" for x in range(4)] + ["}"])
_PAIR_ASM_BF16 = gl.constexpr(_PAIR_ASM.replace("MAGIC", "0x43004300"))  # bf16 128 + q
_PAIR_ASM_FP16 = gl.constexpr(_PAIR_ASM.replace("MAGIC", "0x64006400"))  # fp16 1024 + q


@gluon.jit
def _dequantize(words, dtype: gl.constexpr):
    """words: [BN, 16] int32 as loaded (_word_layout) -> [BN, 128] MAGIC + q in dtype, in physical order of k."""
    if dtype == gl.bfloat16:
        asm: gl.constexpr = _PAIR_ASM_BF16
    else:
        asm: gl.constexpr = _PAIR_ASM_FP16
    BN: gl.constexpr = words.shape[0]
    words = gl.inline_asm_elementwise(_TRANSPOSE_ASM, "=r,=r,=r,=r,r,r,r,r", [words], dtype=gl.int32,
                                      is_pure=False, pack=4)  # a row's 4 words at once
    # w4a16_direct.py's pairing with one K split of warps: output x holds k 32x + 8j + 2c + e
    t = _nibble_pairs(gl.reshape(words, [1, BN, 16]), asm)  # [1, BN, c, j, e, x0, x1]
    t = gl.permute(t, (0, 1, 6, 5, 3, 2, 4))  # [1, BN, x1, x0, j, c, e]: k = 64 x1 + 32 x0 + 8j + 2c + e
    return gl.reshape(t, [BN, BLOCK_K]).to(dtype, bitcast=True)


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
def _x_block(x_desc, xs, ready, i, kb0, num_kb, m0, pred):
    """Starts the TMA load of x block kb0 + i (the last block for i past the end: its scale is 0) into slot
    (i // 2) % (STAGES // 2) of the ring of its parity (xs, ready: that parity's slots and barriers), if pred."""
    slot = (i // 2) % xs.shape[0]
    mbarrier.expect(ready.index(slot), x_desc.block_type.nbytes, pred=pred)
    _tma_load(x_desc, [m0, gl.minimum(kb0 + i, num_kb - 1) * BLOCK_K], ready.index(slot), xs.index(slot),
              pred=pred)


@gluon.jit
def _step(i, n_loads, buf, acc, xs, ready, x_desc, kb0, num_kb, m0, a_layout: gl.constexpr, magic: gl.constexpr,
          ASYNC: gl.constexpr):
    """Block kb0 + i, whose parity's ring is xs/ready: waits for its x, adds the weights' product to acc and refills
    a slot of the same ring (so a step touches one allocation: Triton's barrier analysis then separates the rings):
    its own with block i + STAGES, or, ASYNC, that of block i - 2 (whose wgmma is done) with block i - 2 + STAGES."""
    STAGES: gl.constexpr = 2 * xs.shape[0]
    slot = (i // 2) % xs.shape[0]
    mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
    a = _operand(buf, a_layout, magic)
    if ASYNC:
        acc = warpgroup_mma(a, xs.index(slot).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        _cta_barrier()  # every warp's wgmma i - 1 (and so i - 2) has read its slot
        _x_block(x_desc, xs, ready, i - 2 + STAGES, kb0, num_kb, m0, (i >= 2) & (i - 2 + STAGES < n_loads))
    else:
        acc = warpgroup_mma(a, xs.index(slot).permute((1, 0)), acc)
        _cta_barrier()  # every warp's wgmma has read the slot
        _x_block(x_desc, xs, ready, i + STAGES, kb0, num_kb, m0, i + STAGES < n_loads)
    return acc


@gluon.jit
def _w4_wgmma_kernel(x_desc, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, M, N, num_kb, stride_qn,
                     stride_sn, stride_ym, GROUP_SIZE: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                     ASYNC: gl.constexpr, HAS_BIAS: gl.constexpr):
    NW: gl.constexpr = 4  # one warpgroup
    BN: gl.constexpr = 64
    BM: gl.constexpr = x_desc.block_type.shape[0]
    dtype: gl.constexpr = x_desc.dtype
    magic: gl.constexpr = 128.0 if dtype == gl.bfloat16 else 1024.0
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                         instr_shape=[16, BM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, a_layout)  # [BN]
    w_layout: gl.constexpr = _word_layout()

    pid = gl.program_id(0)
    num_m = gl.cdiv(M, BM)
    row0 = (pid // num_m) * BN
    m0 = (pid % num_m) * BM
    blocks_per_split = gl.cdiv(num_kb, SPLIT_K)
    kb0 = gl.program_id(1) * blocks_per_split
    kb_end = gl.minimum(num_kb, kb0 + blocks_per_split)
    n_loads = gl.maximum(gl.cdiv(kb_end - kb0, 2) * 2, 0)  # x blocks the loop takes (two a turn)

    # weight words [BN, 16], scales and zero points [BN] of block 0; rows past N read row N - 1 (not stored)
    rows = gl.minimum(row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, w_layout)), N - 1)
    w_ptrs = (qw_ptr.to(gl.pointer_type(gl.int32)) + rows[:, None] * (stride_qn // 4)
              + gl.arange(0, 16, layout=gl.SliceLayout(0, w_layout))[None, :])
    s_rows = gl.minimum(row0 + gl.arange(0, BN, layout=row_layout), N - 1)
    s_ptrs = s_ptr + s_rows * stride_sn
    z_ptrs = z_ptr + s_rows * stride_sn
    # x blocks [BM, 128] arrive by TMA (rows past M as zeros) in two rings of slots, each slot with its barrier
    xs0 = gl.allocate_shared_memory(dtype, [STAGES // 2, BM, BLOCK_K], x_desc.layout)  # even blocks
    xs1 = gl.allocate_shared_memory(dtype, [STAGES // 2, BM, BLOCK_K], x_desc.layout)  # odd blocks
    ready0 = gl.allocate_shared_memory(gl.int64, [STAGES // 2, 1], mbarrier.MBarrierLayout())
    ready1 = gl.allocate_shared_memory(gl.int64, [STAGES // 2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES // 2):
        mbarrier.init(ready0.index(i), count=1)
        mbarrier.init(ready1.index(i), count=1)
    fence_async_shared()
    for i in gl.static_range(0, STAGES, 2):
        _x_block(x_desc, xs0, ready0, i, kb0, num_kb, m0, i < n_loads)
        _x_block(x_desc, xs1, ready1, i + 1, kb0, num_kb, m0, i + 1 < n_loads)

    acc = gl.zeros([BN, BM], gl.float32, acc_layout)  # yᵀ partial sums
    # two blocks of weight registers in flight, each reloaded right after use (the loop is unrolled twice, so
    # nothing is copied between them); blocks past kb_end add 0
    w_args = (w_ptrs, s_ptrs, z_ptrs, kb_end, num_kb, GROUP_SIZE)
    x_args0 = (xs0, ready0, x_desc, kb0, num_kb, m0)
    x_args1 = (xs1, ready1, x_desc, kb0, num_kb, m0)
    buf0 = _weights(kb0, *w_args)
    buf1 = _weights(kb0 + 1, *w_args)
    for i in range(0, n_loads, 2):
        acc = _step(i, n_loads, buf0, acc, *x_args0, a_layout, magic, ASYNC)
        buf0 = _weights(kb0 + i + 2, *w_args)
        acc = _step(i + 1, n_loads, buf1, acc, *x_args1, a_layout, magic, ASYNC)
        buf1 = _weights(kb0 + i + 3, *w_args)
    if ASYNC:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for i in gl.static_range(STAGES // 2):
        mbarrier.invalidate(ready0.index(i))
        mbarrier.invalidate(ready1.index(i))

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
            for sk in gl.static_range(SPLIT_K):  # unrolled, so every partial's load is in flight at once
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


# (SPLIT_K, STAGES, ASYNC): programs an output tile's K is split over, x slots (even; 4 or more with ASYNC, which
# refills the slot of block i - 2), asynchronous wgmma
CONFIGS = [(s, t, a) for s in (2, 4, 8) for t, a in ((2, False), (4, True))]  # (4, sync) never won on the H100
_checked = {}  # (device index, dtype) -> whether the kernel matched the reference on a small odd case
_tuned = choices_on_disk(__file__, CONFIGS)  # (dtype, M bucket, N, K, G) -> the fastest; kept on disk


def tile_m(m: int) -> int:
    """The x rows a program takes (wgmma's n): M rounded up to a power of two, 16 to 128."""
    return min(max(triton.next_power_of_2(m), 16), MAX_M)


def choose(x: torch.Tensor, qweight: torch.Tensor, group_size: int, bits: int):
    """x: [M, K] contiguous, qweight: [N, K // 2] contiguous -> the config to run this kernel with, or None for
    linear_wq's other paths. The first call per device and dtype checks the kernel against the reference (a failure
    to compile or a wrong result warns and turns it off); the first call per shape times CONFIGS and keeps the
    fastest (`w4a16_first_use.py`)."""
    return first_use_config(x, qweight, group_size, bits, range(MIN_M, MAX_M + 1), _checked, _tuned,
                            _matches_reference, lambda *shape: fastest_streaming(linear_w4_wgmma, CONFIGS, *shape))


def _matches_reference(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernel on a small odd case (partial tiles, 37 rows of x, groups of 256, bias, split K) against the
    reference."""
    return matches_reference(lambda *args: linear_w4_wgmma(*args, (2, 2, False)), "wgmma W4A16 kernel",
                             "using linear_wq's other paths instead", 37, 200, 1280, 256, device, dtype)


def linear_w4_wgmma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias,
                    group_size: int, config=None) -> torch.Tensor:
    """x [M, K] (16-bit, contiguous), qweight [N, K // 2] uint8 (contiguous), scales/zeros [N, K // G], bias [N] or
    None -> y [M, N]. config: (split_k, stages, asynchronous wgmma), CONFIGS[0] when None."""
    m, k = x.shape
    n = qweight.shape[0]
    scales = scales.contiguous()
    zeros = zeros.to(scales.dtype).contiguous()
    split_k, stages, asynchronous = config or CONFIGS[0]
    assert stages % 2 == 0 and stages >= (4 if asynchronous else 2), f"{stages} x slots: even, 4 or more if async"
    bm = tile_m(m)
    n_tiles = triton.cdiv(n, 64) * triton.cdiv(m, bm)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # y: [M, N]
    ws = torch.empty(split_k if split_k > 1 else 0, m, n, dtype=torch.float32, device=x.device)  # ws: [S, M, N]
    counters = arrival_counters(x.device, n_tiles)
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [bm, TILE_K], _X_SMEM_LAYOUT)
    _w4_wgmma_kernel[(n_tiles, split_k)](
        x_desc, qweight, scales, zeros, bias if bias is not None else scales, y, ws, counters,
        m, n, k // TILE_K, qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, SPLIT_K=split_k, STAGES=stages, ASYNC=asynchronous, HAS_BIAS=bias is not None,
        num_warps=4,
    )
    return y
