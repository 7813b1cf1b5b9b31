"""Weight-only 4-bit linear for decode (M <= 16) in Gluon: weights go from global memory straight into mma registers.

Entry points: `linear_w4_direct(x [M, K] bf16/fp16, qweight [N, K // 2] uint8, scales [N, K // G], zeros, bias,
group_size, config=None) -> y [M, N]`, and `choose(x, qweight, group_size, bits) -> config | None`, which
`linear_wq` asks first: None means "use the Triton kernel" (another GPU than sm_90, another dtype or width, M > 16,
misaligned operands, this kernel failed its one-time check on this Triton, or, at M = 9-16, the Triton kernel timed
faster). Weights are 4-bit (or 3-bit, in 4-bit slots) in the canonical layout (`llmopt/ops/linear_wq.py`: even k in
the low nibble), G a power of two >= 128. Same function as `torch.ops.llmopt.linear_wq` up to fp32 rounding: per
128-k block the tensor cores sum (MAGIC + q) * x and, in a second product with a tile of ones, Σ x; the block adds
s * (that - (MAGIC + z) Σ x) in fp32 (the reference rounds (q - z) * s to 16 bits first, then sums).

Why a second kernel beside `w4a16_gemm.py`'s: a decode GEMV has only to stream the weight bytes, so what counts
is how many are in flight and how little stands between a load and its use. Here no shared memory and no layout
conversion do: each thread loads 16 contiguous bytes of two weight rows per 128-k block (one 16-byte load
apiece), and those registers are, nibble for nibble, the A operand of `mma.m16n8k16` once turned into floats
(one shift and one `lop3` into the mantissa of 128.0 per two weights; 1024.0 for fp16). A program is 16 weight rows
and KW warps that split K between them (block it * KW + wk for warp wk); each warp holds two blocks of registers,
reloading one as soon as it is used (the loop is unrolled twice, so nothing is copied between them, and an odd last
block follows it: a padded iteration cost 4-8% at 4096 x 11008, session 26), and the warps' partial sums meet once,
at the end, through shared memory into a layout that puts an output's KW partials in one thread's registers
(`gl.sum` straight over the mma layout's warp axis cost 2.2 of 6.9 µs at 4096 x 4096, M = 1, session 26). x, which
L2 holds, is loaded a block ahead too, or, in the LATE_X configs, right before its block: that holds 16 fewer
registers a thread and was 4-9% faster at 4096 x 4096, 3-6% slower at the other shapes (session 27), so first-use
tuning picks per shape. More blocks a warp did not pay: up to eight was no faster, even with every weight byte asked
for before the PDL wait below, and its registers cost programs an SM (session 23); three, held to 128 registers, was
within 1% of two at 4096 x 11008 and slower elsewhere (sessions 26-27); nor was a ring of up to eight blocks a warp
in shared memory, filled by `cp.async` (1.05-1.22x slower, session 26), nor storing each 16-row tile's bytes
contiguously (a kernel that only reads them: 0.97-1.00x the row-major time, session 27). Measured on the H100 beside
the shipped Triton kernel: 1.34-1.64x it at M = 1 (session 27). M = 9-16 takes two x tiles of 8 rows (two mma
n-tiles, XM = 16): there each warp reads 4 KB of x for 1-2 KB of weights a block, so it won at 4096 x 4096, M = 16
(1.34x the Triton kernel), tied at 4096 x 11008 and lost at 11008 x 4096 (session 27; with x a block ahead and the
old sum, session 23, it lost everywhere), hence first-use tuning times the Triton kernel beside it there.

How 16 contiguous bytes become an mma operand without moving data: a dot's sum does not depend on the order of
k, so the kernel sums in a "logical" order of its own, the same for the weights and for x. A thread in lane-quad
position c holds the physical k 32c .. 32c + 31 of a block (four words j of eight nibbles). From word j the
shift and `lop3` give four registers p = 0..3 of two values each, the nibbles p and p + 4: physical k
32c + 8j + p + 4e (e = 0, 1). They are labelled logical k = e + 2c + 8p + 32j, which is where mma's A layout
(k_width 2) expects a thread in position c to hold its pairs. x is loaded as the same 32 physical values of the
same thread position and paired the same way (one `prmt` per register), so the B operand matches: both
`convert_layout(..., assert_trivial=True)` compile to nothing.

Launched with programmatic dependent launch (`pdl.py`; `launch_pdl`), a program lets the next kernel start, asks
for its first two blocks of weights, zero points and scales (constants: no kernel writes them), then waits for the
previous kernel before it loads x, so the next call's launch and first weight bytes hide under this call's tail.
On the H100 a stream of M = 1 calls ran 1.09-1.17x faster than without PDL (1.04-1.09x faster than waiting before
the weights too); asking L2 for all of a program's rows before the wait (`cp.async.bulk.prefetch`) was slower
(benchmarks/RESULTS.md, session 22).
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from llmopt.codegen.kernels import pdl, pdl_gluon
from llmopt.codegen.kernels.w4a16_first_use import (TILE_K, choices_on_disk, fastest_streaming, first_use_config,
                                                     matches_reference)

BLOCK_K = gl.constexpr(TILE_K)
X_TILE = 8  # x rows an mma n-tile takes
MAX_M = 2 * X_TILE  # x rows: one n-tile up to M = 8, two above


@gluon.constexpr_function
def _word_layout(kw: int, row_tiles: int) -> gl.DistributedLinearLayout:
    """[KW, BN, 16] int32 weight words of one 128-k block a warp: a thread holds 4 contiguous words (16 bytes)
    of rows g and g + 8 of each 16-row tile (g = lane // 4), at word 4c (c = lane % 4); warps split K."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 8, 0]] + [[0, 16 << i, 0] for i in range(row_tiles.bit_length() - 1)],
        lane_bases=[[0, 0, 4], [0, 0, 8], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=[[1 << i, 0, 0] for i in range(kw.bit_length() - 1)],
        block_bases=[], shape=[kw, 16 * row_tiles, 16])


@gluon.constexpr_function
def _x_layout(kw: int, xm: int) -> gl.DistributedLinearLayout:
    """[KW, XM, 64] int32 x words (2 values each) of one 128-k block: the thread in lane g, position c holds x row
    g's (and, at XM = 16, row g + 8's) words 16c .. 16c + 15 (its 32 physical k, as for the weights)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8]] + ([[0, 8, 0]] if xm == 16 else []),
        lane_bases=[[0, 0, 16], [0, 0, 32], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=[[1 << i, 0, 0] for i in range(kw.bit_length() - 1)],
        block_bases=[], shape=[kw, xm, 64])


# a weight word (8 nibbles, two int16 elements) -> 4 registers p of the float pair (MAGIC + nibble p, MAGIC + nibble
# p + 4): the element pair (e = 0, 1) of plane p
_W_ASM = " ".join(["{ .reg .b32 u;"] + [f"shr.b32 u, $4, {4 * p}; lop3.b32 ${p}, u, 0x000F000F, MAGIC, 0xea;"
                                        for p in range(4)] + ["}"])
_W_ASM_BF16 = gl.constexpr(_W_ASM.replace("MAGIC", "0x43004300"))  # bf16 128 + q
_W_ASM_FP16 = gl.constexpr(_W_ASM.replace("MAGIC", "0x64006400"))  # fp16 1024 + q
# two x words a (e = 0) and b (e = 1) of two values each -> the pairs (a.lo, b.lo) and (a.hi, b.hi)
_X_ASM = gl.constexpr("prmt.b32 $0, $2, $3, 0x5410; prmt.b32 $1, $2, $3, 0x7632;")


@gluon.jit
def _nibble_pairs(words, asm: gl.constexpr):
    """words: [KW, BN, 16] int32 -> [KW, BN, c, j, e, p0, p1] int16: output p = 2 p1 + p0 of asm (one 16-bit float
    pair a register, from two 16-bit halves of a word at once) for half e of word 4c + j. Both Gluon W4A16 kernels'
    dequantization; they differ in asm and in how they order the result."""
    lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [words], dtype=(gl.int16, gl.int16),
                                      is_pure=True, pack=1)
    halves = gl.reshape(gl.join(lo, hi), [words.shape[0], words.shape[1], 32])
    p = gl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r", [halves], dtype=(gl.int16, ) * 4, is_pure=True, pack=2)
    shape: gl.constexpr = [words.shape[0], words.shape[1], 4, 4, 2]  # c, j (word 4c + j), e (its half)
    return gl.join(gl.join(gl.reshape(p[0], shape), gl.reshape(p[1], shape)),
                   gl.join(gl.reshape(p[2], shape), gl.reshape(p[3], shape)))


@gluon.jit
def _dequantize(words, dtype: gl.constexpr):
    """words: [KW, BN, 16] int32 -> [KW, BN, 128] MAGIC + q in dtype, logical k (module docstring)."""
    if dtype == gl.bfloat16:
        asm: gl.constexpr = _W_ASM_BF16
    else:
        asm: gl.constexpr = _W_ASM_FP16
    t = _nibble_pairs(words, asm)  # [KW, BN, c, j, e, p0, p1]
    t = gl.permute(t, (0, 1, 3, 6, 5, 2, 4))  # [KW, BN, j, p1, p0, c, e]: logical k = e + 2c + 8p + 32j
    return gl.reshape(t, [words.shape[0], words.shape[1], BLOCK_K]).to(dtype, bitcast=True)


@gluon.jit
def _x_operand(xw, dtype: gl.constexpr):
    """xw: [KW, XM, 64] int32 x words (word 16c + 4j + 2e + h holds physical k 32c + 8j + 4e + 2h + b, b = 0, 1)
    -> [KW, XM, 128] in dtype, logical k as the weights' (p = 2h + b)."""
    lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [xw], dtype=(gl.int16, gl.int16),
                                      is_pure=True, pack=1)
    t = gl.reshape(gl.join(lo, hi), [xw.shape[0], xw.shape[1], 4, 4, 2, 2, 2])  # c, j, e, h, b
    a, b = gl.split(gl.permute(t, (0, 1, 2, 3, 5, 6, 4)))  # e = 0 and e = 1: [KW, XM, c, j, h, b]
    lo, hi = gl.inline_asm_elementwise(_X_ASM, "=r,=r,r,r", [a, b], dtype=(gl.int16, ) * 2, is_pure=True, pack=2)
    t = gl.join(lo, hi)  # [KW, XM, c, j, h, e, p0]: lo holds b = 0 (e = 0, 1), hi b = 1
    t = gl.permute(t, (0, 1, 3, 4, 6, 2, 5))  # [KW, XM, j, h (p1), p0, c, e]
    return gl.reshape(t, [xw.shape[0], xw.shape[1], BLOCK_K]).to(dtype, bitcast=True)


@gluon.jit
def _load_weights(it, w_ptrs, z_ptrs, s_ptrs, wk, sk, num_kb, KW: gl.constexpr, GROUP_SIZE: gl.constexpr):
    """Iteration it's weight operands, warp wk taking block it * KW + wk (past the last block: block num_kb - 1
    again, with scale 0, so it adds nothing): weight words [KW, BN, 16] int32, zero points and scales [KW, BN]."""
    kb_w = gl.minimum(it * KW + wk, num_kb - 1)
    kb_s = it * KW + sk
    words = gl.load(w_ptrs + (kb_w * (BLOCK_K // 8))[:, None, None])
    g = (gl.minimum(kb_s, num_kb - 1) * BLOCK_K // GROUP_SIZE)[:, None]
    z = gl.load(z_ptrs + g)
    s = gl.load(s_ptrs + g, mask=(kb_s < num_kb)[:, None], other=0.0)
    return words, z, s


@gluon.jit
def _load_x(it, x_ptrs, xk, num_kb, KW: gl.constexpr):
    """Iteration it's x words [KW, XM, 64] int32 (block it * KW + xk, clamped to the last)."""
    return gl.load(x_ptrs + (gl.minimum(it * KW + xk, num_kb - 1) * (BLOCK_K // 2))[:, None, None])


@gluon.jit
def _x_ahead(it, x_ptrs, xk, num_kb, KW: gl.constexpr, LATE_X: gl.constexpr):
    """Iteration it's x words loaded ahead of their block (`_load_x`), or 0 where LATE_X: `_accumulate` loads them."""
    if LATE_X:
        xw = 0
    else:
        xw = _load_x(it, x_ptrs, xk, num_kb, KW)
    return xw


@gluon.jit
def _load_block(it, w_ptrs, x_ptrs, z_ptrs, s_ptrs, wk, xk, sk, num_kb, KW: gl.constexpr,
                GROUP_SIZE: gl.constexpr, LATE_X: gl.constexpr):
    """Iteration it's operands: weight words [KW, BN, 16] and x words [KW, XM, 64] int32 (or 0, `_x_ahead`),
    zero points and scales [KW, BN]."""
    words, z, s = _load_weights(it, w_ptrs, z_ptrs, s_ptrs, wk, sk, num_kb, KW, GROUP_SIZE)
    return words, _x_ahead(it, x_ptrs, xk, num_kb, KW, LATE_X), z, s


@gluon.jit
def _accumulate(acc, block, it, x_ptrs, xk, num_kb, ones, a_layout: gl.constexpr, b_layout: gl.constexpr,
                magic: gl.constexpr, KW: gl.constexpr, LATE_X: gl.constexpr):
    """acc [KW, BN, XM] fp32 yᵀ + iteration it's block (_load_block's tuple; its x words loaded now where
    LATE_X): s * (Σ (MAGIC + q) x - (MAGIC + z) Σ x)."""
    words, xw, z, s = block
    if LATE_X:
        xw = _load_x(it, x_ptrs, xk, num_kb, KW)
    dtype: gl.constexpr = ones.dtype
    zero = gl.zeros_like(acc)
    w = gl.convert_layout(_dequantize(words, dtype), a_layout, assert_trivial=True)  # [KW, BN, 128]
    xt = gl.convert_layout(gl.permute(_x_operand(xw, dtype), (0, 2, 1)), b_layout, assert_trivial=True)
    raw = mma_v2(w, xt, zero)  # Σ (MAGIC + q) x: [KW, BN, XM]
    sx = mma_v2(ones, xt, zero)  # Σ x, in every row
    zb = z.to(gl.float32) + magic
    return acc + s.to(gl.float32)[:, :, None] * (raw - zb[:, :, None] * sx)


@gluon.jit
def _w4_direct_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, num_kb, stride_xm, stride_qn, stride_sn,
                      stride_ym, GROUP_SIZE: gl.constexpr, KW: gl.constexpr, ROW_TILES: gl.constexpr,
                      HAS_BIAS: gl.constexpr, PDL: gl.constexpr, LATE_X: gl.constexpr,
                      XM: gl.constexpr):
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    magic: gl.constexpr = 128.0 if dtype == gl.bfloat16 else 1024.0
    BN: gl.constexpr = 16 * ROW_TILES
    w_layout: gl.constexpr = _word_layout(KW, ROW_TILES)
    x_layout: gl.constexpr = _x_layout(KW, XM)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[KW, 1, 1],
                                                         instr_shape=[1, 16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=acc_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(2, acc_layout)  # [KW, BN]
    row0 = gl.program_id(0) * BN

    # weight words [1, BN, 16] of block 0; rows past N read row N - 1 (their outputs are not stored)
    wk = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_layout)))
    rows = gl.minimum(row0 + gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_layout))), N - 1)
    wu = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_layout)))
    w_ptrs = qw_ptr.to(gl.pointer_type(gl.int32)) + rows[None, :, None] * (stride_qn // 4) + wu[None, None, :]
    # x words [1, XM, 64] of block 0
    xk = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_layout)))
    # rows past M: copies of row M - 1
    xm = gl.minimum(gl.arange(0, XM, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_layout))), M - 1)
    xu = gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_layout)))
    x_ptrs = x_ptr.to(gl.pointer_type(gl.int32)) + xm[None, :, None] * (stride_xm // 2) + xu[None, None, :]
    # zero points and scales [1, BN] of group 0, in the accumulator's row layout
    sk = gl.arange(0, KW, layout=gl.SliceLayout(1, row_layout))
    s_rows = gl.minimum(row0 + gl.arange(0, BN, layout=gl.SliceLayout(0, row_layout)), N - 1)
    s_ptrs = s_ptr + s_rows[None, :] * stride_sn
    z_ptrs = z_ptr + s_rows[None, :] * stride_sn
    ptrs = (w_ptrs, x_ptrs, z_ptrs, s_ptrs, wk, xk, sk, num_kb, KW, GROUP_SIZE)

    if PDL:  # the next kernel may start now
        pdl_gluon.launch_dependents(sk)
    ones = gl.full([KW, BN, BLOCK_K], 1.0, dtype, a_layout)  # its product with x: Σx over the block in every row
    acc = gl.zeros([KW, BN, XM], gl.float32, acc_layout)  # yᵀ partial sums, one a warp
    fold = (x_ptrs, xk, num_kb, ones)  # _accumulate's arguments after the iteration, up to the layouts
    # two sets of registers (weights, and x unless LATE_X), each reloaded right after its block is used, so a load has
    # a block of work to arrive in (x, from L2, none where LATE_X); the loop is unrolled twice (no copies between the
    # sets), an odd last block follows it; blocks past the end (the last warps' last, where KW does not divide the
    # blocks) add 0
    n_it = gl.cdiv(num_kb, KW)  # blocks a warp
    # the first blocks' weights, zero points and scales: constants no kernel writes (pdl.py), so they are asked for
    # before the wait and arrive while the previous kernel finishes; x, its output, only after it
    w0, z0, s0 = _load_weights(0, w_ptrs, z_ptrs, s_ptrs, wk, sk, num_kb, KW, GROUP_SIZE)
    w1, z1, s1 = _load_weights(1, w_ptrs, z_ptrs, s_ptrs, wk, sk, num_kb, KW, GROUP_SIZE)
    if PDL:
        pdl_gluon.wait_for_previous(sk)
    buf0 = (w0, _x_ahead(0, x_ptrs, xk, num_kb, KW, LATE_X), z0, s0)
    buf1 = (w1, _x_ahead(1, x_ptrs, xk, num_kb, KW, LATE_X), z1, s1)
    for it in range(0, n_it - 1, 2):
        acc = _accumulate(acc, buf0, it, *fold, a_layout, b_layout, magic, KW, LATE_X)
        buf0 = _load_block(it + 2, *ptrs, LATE_X)
        acc = _accumulate(acc, buf1, it + 1, *fold, a_layout, b_layout, magic, KW, LATE_X)
        buf1 = _load_block(it + 3, *ptrs, LATE_X)
    if n_it % 2 == 1:
        acc = _accumulate(acc, buf0, n_it - 1, *fold, a_layout, b_layout, magic, KW, LATE_X)

    # the warps' partial sums meet: through shared memory into a layout where each thread holds one output's KW
    # partials, then added in registers (gl.sum over the mma layout's warp axis cost 2.2 µs a call, session 26)
    sum_layout: gl.constexpr = gl.BlockedLayout([KW, 1, 1], [1, 32 // XM, XM], [1, KW, 1], [2, 1, 0])
    y = gl.sum(gl.convert_layout(acc, sum_layout), axis=0)  # [BN, XM]
    y_layout: gl.constexpr = gl.SliceLayout(0, sum_layout)
    offs_n = row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, y_layout))
    offs_m = gl.arange(0, XM, layout=gl.SliceLayout(0, y_layout))
    if HAS_BIAS:
        y += gl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    gl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], y.to(dtype), mask=mask)


# (KW, ROW_TILES, LATE_X), each the best on the H100 somewhere; LATE_X: x loaded right before its block instead of a
# block ahead, which frees 16 registers and won 4-9% at 4096 x 4096 (M = 1, 8), lost 3-6% at the other shapes
CONFIGS = [(8, 1, False), (4, 2, False), (4, 1, False), (2, 1, False), (16, 1, False), (8, 2, False), (8, 1, True)]
# M = 9-16 (two x tiles): the best three of a sweep on the H100 (session 27); x a block ahead costs too many registers
WIDE_CONFIGS = [(8, 2, True), (4, 2, True), (8, 1, True)]
_checked = {}  # (device index, dtype) -> whether one x tile (M <= 8) matched the reference on a small odd case
_wide_checked = {}  # the same for two x tiles (M = 9-16)
# (dtype, M bucket, N, K, G) -> the fastest config, or None where the Triton kernel was; kept on disk
_tuned = choices_on_disk(__file__, CONFIGS + WIDE_CONFIGS + [None])


def configs_for(m: int) -> list:
    """The configs first-use tuning times for m rows of x (M <= 16)."""
    return CONFIGS if m <= X_TILE else WIDE_CONFIGS


def choose(x: torch.Tensor, qweight: torch.Tensor, group_size: int, bits: int):
    """x: [M, K] contiguous, qweight: [N, K // 2] contiguous -> the (KW, ROW_TILES, LATE_X) config to run
    this kernel with, or None for the Triton kernel. The first call per device and dtype checks the kernel (Gluon's
    API moves between Triton releases: a failure to compile or a wrong result warns and turns it off), one x tile
    (M <= 8) and two (M = 9-16) apart, so that one failing leaves the other; the first call per shape times
    `configs_for(M)` and keeps the fastest (`w4a16_first_use.py`); at M = 9-16, where the Triton kernel won at some
    shapes (session 27), it is timed beside them and None is kept when it is the fastest."""
    if x.shape[0] <= X_TILE:
        return first_use_config(x, qweight, group_size, bits, range(1, X_TILE + 1), _checked, _tuned,
                                _matches_reference, _fastest_narrow)
    return first_use_config(x, qweight, group_size, bits, range(X_TILE + 1, MAX_M + 1), _wide_checked, _tuned,
                            _wide_matches_reference, _fastest_wide)


def _fastest_narrow(x: torch.Tensor, n: int, k: int, group_size: int):
    """M <= 8: the fastest of `CONFIGS` for x against [n, k] weights, streamed from memory."""
    return fastest_streaming(linear_w4_direct, CONFIGS, x, n, k, group_size)


def _fastest_wide(x: torch.Tensor, n: int, k: int, group_size: int):
    """M = 9-16: the fastest of `WIDE_CONFIGS` and the Triton kernel (None) for x against [n, k] weights."""
    return fastest_streaming(_direct_or_triton, WIDE_CONFIGS + [None], x, n, k, group_size)


def _direct_or_triton(x, qweight, scales, zeros, bias, group_size: int, config):
    """This kernel with config, or, for None, the Triton kernel that `linear_wq` runs without it."""
    if config is not None:
        return linear_w4_direct(x, qweight, scales, zeros, bias, group_size, config)
    from llmopt.codegen.kernels.w4a16_gemm import linear_wq_triton  # it imports this module

    return linear_wq_triton(x, qweight, scales, zeros.to(scales.dtype), bias, group_size, 4)


def _matches_reference(device: torch.device, dtype: torch.dtype) -> bool:
    """One x tile on a small odd case (partial row tile, 3 rows of x, groups of 256, bias) against the reference."""
    return matches_reference(lambda *args: linear_w4_direct(*args, CONFIGS[0]), "direct W4A16 kernel",
                             "using the Triton kernel instead", 3, 100, 1024, 256, device, dtype)


def _wide_matches_reference(device: torch.device, dtype: torch.dtype) -> bool:
    """Two x tiles on the same case with 12 rows of x."""
    return matches_reference(lambda *args: linear_w4_direct(*args, WIDE_CONFIGS[0]),
                             "direct W4A16 kernel (9-16 rows)", "using the Triton kernel there", 12, 100, 1024, 256,
                             device, dtype)


def linear_w4_direct(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias,
                     group_size: int, config=None, launch_pdl=None) -> torch.Tensor:
    """x [M, K] (M <= 16, 16-bit, contiguous), qweight [N, K // 2] uint8 (contiguous), scales/zeros [N, K // G],
    bias [N] or None -> y [M, N]. config: (KW, ROW_TILES, LATE_X), `configs_for(M)[0]` when None; launch_pdl:
    programmatic dependent launch (`pdl.py`), `pdl.enabled()` when None."""
    m, k = x.shape
    n = qweight.shape[0]
    scales = scales.contiguous()
    zeros = zeros.to(scales.dtype).contiguous()
    assert 1 <= m <= MAX_M, f"{m} rows of x: the direct kernel takes 1 to {MAX_M}"
    kw, row_tiles, late_x = config or configs_for(m)[0]
    launch_pdl = pdl.enabled() if launch_pdl is None else launch_pdl
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # y: [M, N]
    _w4_direct_kernel[(triton.cdiv(n, 16 * row_tiles), )](
        x, qweight, scales, zeros, bias if bias is not None else scales, y,
        m, n, k // TILE_K, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, KW=kw, ROW_TILES=row_tiles, HAS_BIAS=bias is not None, PDL=launch_pdl,
        LATE_X=late_x, XM=X_TILE if m <= X_TILE else MAX_M, num_warps=kw, launch_pdl=launch_pdl,
    )
    return y
