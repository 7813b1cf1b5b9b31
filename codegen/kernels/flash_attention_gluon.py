"""Prefill attention for Hopper (sm_90) written in Gluon: FlashAttention-3's schedule, by hand.

Entry point: `flash_attention_gluon(q [B, Hq, T, D], k [B, Hkv, S, D], v, out [B, Hq, T, D], scale, causal) -> out`.

Each 128-row tile of one head runs in three warp-specialized partitions:
- a producer (one warp) issues TMA loads: the two 64-row halves of Q, then K and V blocks into a ring of
  `STAGES` shared-memory slots, each slot freed when both consumers have finished with it;
- two consumers (one warp group each, 64 query rows each) run QKᵀ, the online softmax and PV with
  asynchronous wgmma. Inside a consumer, block j's QKᵀ and block j-1's PV are issued together and the
  softmax of block j runs while PV is still on the tensor cores (FA3's intra-warp-group overlap).
  Between consumers, an mbarrier pair passes a turn so that one group issues its GEMMs while the other
  does its softmax (FA3's ping-pong).
The grid is one program per SM; programs claim 128-row tiles in order from a global counter (zeroed before
each launch) as they free up (heads outermost, so programs running together share K/V in L2; the longest causal tiles of a head
first), and the producer loads the next tile's Q and K/V while the consumers finish the last one: a consumer
releases its Q as soon as its last QKᵀ is done, before that block's softmax and the last PV, and normalizes the
output by one reciprocal a row and a multiply an element (ptxas already shared the reciprocal of a per-element
division, but kept range checks around each quotient: 8503 -> 7799 lines of SASS for the kernel, compiled for
sm_90 with Triton 3.6). Those two changes together took 1k tokens from 0.99x to 1.05x cuDNN on an H100 (session 14,
scratch comparison, benchmarks/RESULTS.md), output bit-identical.
Blocks wholly visible to every row of the tile skip the mask; the rest apply the causal and key limits.
Rows and keys past the end load as zeros (TMA descriptors made on the host over [B, H, T, D]); the
output is stored from registers, rows past the end masked, as 16-byte vectors: a transpose within each quad of
lanes (`_columns_per_thread`, shuffles, no shared memory: none is left) gives each thread 8 consecutive columns
instead of the wgmma layout's pairs. In a scratch comparison (H100, session 13, benchmarks/RESULTS.md), the
kernel with its store masked off entirely ran 14% faster at 1k tokens; the 16-byte stores got back 7% there, 4% at 2k.
Measured on the H200 against a one-tile-per-program grid, a static round-robin persistent grid, 2 stages
and no ping-pong (benchmarks/RESULTS.md, session 11): this configuration was best or within noise.
"""
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

ROWS_PER_GROUP, BLOCK_N, STAGES = 64, 128, 3  # 3 stages: 224 KB of shared memory with Q
_BOX_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
# Gluon is young: Triton 3.9 renamed the TMA load (3.6 has only the old name)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


@gluon.jit
def _tile(t, num_bh, num_q_heads, num_m_blocks, TILE_M: gl.constexpr):
    """Tile t -> (b, h, first query row): heads outermost, so programs running together share K/V in L2;
    within a head the longest causal tiles first."""
    bh = t // num_m_blocks
    start_m = (num_m_blocks - 1 - t % num_m_blocks) * TILE_M
    return bh // num_q_heads, bh % num_q_heads, start_m


@gluon.jit
def _blocks(start_m, seq_k, shift, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """-> (key blocks this 2·ROWS-row tile reads, how many of them every row sees whole)."""
    hi = seq_k
    n_full = seq_k // BLOCK_N
    if CAUSAL:
        hi = gl.minimum(seq_k, start_m + 2 * ROWS + shift)
        n_full = gl.minimum(n_full, (start_m + shift + 1) // BLOCK_N)
    return gl.cdiv(hi, BLOCK_N), n_full


@gluon.jit
def _claim_tile(counter_ptr):
    """The next tile, in order, to whichever program frees up first (the host zeroes the counter before
    each launch: a reset by the launch's last claim hung on the H200 with Triton 3.6)."""
    return gl.atomic_add(counter_ptr, 1)


@gluon.jit
def _post_tile(tile_ids, tiles_done, t):
    """The producer tells the consumers which tile comes next (an int in shared memory, two slots)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    tile_ids.index(tiles_done % 2).store(gl.full([1], t, gl.int32, layout))


@gluon.jit
def _read_tile(tile_ids, tiles_done):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    return gl.max(tile_ids.index(tiles_done % 2).load(layout), 0)


@gluon.jit
def _producer(descs, buffers, bars, scalars, GROUP: gl.constexpr, CAUSAL: gl.constexpr):
    desc_q, desc_k, desc_v = descs
    q_smem, k_smem, v_smem = buffers
    q_ready, q_empty, k_ready, v_ready, kv_empty, turn, tile_ids = bars
    out_ptr, stride_ob, stride_oh, stride_ot, seq_q, seq_k, num_q_heads, group, qk_scale, num_m_blocks, num_tiles, counter_ptr = scalars
    rows: gl.constexpr = q_smem.shape[1]
    block_n: gl.constexpr = k_smem.shape[1]
    head_dim: gl.constexpr = k_smem.shape[2]
    stages: gl.constexpr = k_smem.shape[0]
    shift = seq_k - seq_q
    num_bh = num_tiles // num_m_blocks
    it = 0  # key blocks loaded so far, over all tiles
    tiles_done = 0
    t = _claim_tile(counter_ptr)
    while t < num_tiles:
        b, h, start_m = _tile(t, num_bh, num_q_heads, num_m_blocks, 2 * rows)
        n_blocks, n_full = _blocks(start_m, seq_k, shift, rows, block_n, CAUSAL)
        for half in gl.static_range(2):
            mbarrier.wait(q_empty.index(half), (tiles_done & 1) ^ 1)  # a fresh barrier passes phase 1
        _post_tile(tile_ids, tiles_done, t)
        for half in gl.static_range(2):
            mbarrier.expect(q_ready.index(half), desc_q.block_type.nbytes)
            _tma_load(desc_q, [b, h, start_m + half * rows, 0], q_ready.index(half),
                                            q_smem.index(half).reshape([1, 1, rows, head_dim]))
        for j in range(n_blocks):
            slot = it % stages
            mbarrier.wait(kv_empty.index(slot), ((it // stages) & 1) ^ 1)
            mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
            _tma_load(desc_k, [b, h // group, j * block_n, 0], k_ready.index(slot),
                                            k_smem.index(slot).reshape([1, 1, block_n, head_dim]))
            mbarrier.expect(v_ready.index(slot), desc_v.block_type.nbytes)
            _tma_load(desc_v, [b, h // group, j * block_n, 0], v_ready.index(slot),
                                            v_smem.index(slot).reshape([1, 1, block_n, head_dim]))
            it += 1
        tiles_done += 1
        t = _claim_tile(counter_ptr)
    for half in gl.static_range(2):  # tell the consumers there is no more work
        mbarrier.wait(q_empty.index(half), (tiles_done & 1) ^ 1)
    _post_tile(tile_ids, tiles_done, t)
    for half in gl.static_range(2):
        mbarrier.arrive(q_ready.index(half), count=1)


@gluon.jit
def _scores_to_probabilities(s, j, n_full, last_key, m_i, l_i, qk_scale, block_n: gl.constexpr,
                             col_layout: gl.constexpr):
    """s: [rows, block_n] raw scores of key block j -> (p [rows, block_n] fp32, alpha [rows], m_i, l_i)."""
    if j >= n_full:  # the diagonal or the partial last block
        keys = j * block_n + gl.arange(0, block_n, layout=col_layout)
        s = gl.where(keys[None, :] <= last_key[:, None], s, -1.0e6)
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)  # log2 units
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.constexpr_function
def _store_layout(rows, head_dim):
    """The output tile [rows, head_dim] with each warp on the rows it holds in the wgmma layout (16 a warp), each
    thread on 8 consecutive columns: a conversion within quads of lanes, no shared memory (there is none to spare)."""
    reg = [[0, 1], [0, 2], [0, 4], [8, 0]] + [[0, 32 << i] for i in range((head_dim // 32).bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[rows, head_dim])


@gluon.jit
def _swap_pairs(x, dim: gl.constexpr):
    """x [rows, r, 2, 2, 4] -> the same with the two halves of dim 2 or 3 swapped (a relabelling of registers).
    Literal permutations: Triton 3.6 takes no computed ones."""
    if dim == 3:
        a, b = gl.split(gl.permute(x, (0, 1, 2, 4, 3)))
        return gl.permute(gl.join(b, a), (0, 1, 2, 4, 3))
    else:
        a, b = gl.split(gl.permute(x, (0, 1, 3, 4, 2)))
        return gl.permute(gl.join(b, a), (0, 1, 4, 2, 3))


@gluon.jit
def _columns_per_thread(out, rows: gl.constexpr, head_dim: gl.constexpr):
    """out [rows, head_dim] (16-bit) in the wgmma accumulator layout, where lane c of a quad holds the column
    pairs 32r + 8j + 2c + {0, 1} (j = 0..3) -> the same values relabelled so that a thread holds 8 consecutive
    columns (32r + 8c + 0..7), for 16-byte stores instead of 4-byte ones.
    A 4x4 transpose of (c, j) within each quad of lanes, on the pairs as 32-bit words: two butterfly rounds of
    shuffles (lane bit b against j's bit b), then a relabelling (a permute of the c and j bits of the column)."""
    lo, hi = gl.split(gl.reshape(out, [rows, head_dim // 2, 2]))
    words = gl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [lo, hi], dtype=gl.int32, is_pure=True,
                                      pack=1)  # [rows, head_dim // 2]: word 16r + 4j + c
    word_layout: gl.constexpr = words.type.layout
    idx = gl.arange(0, head_dim // 2, layout=gl.SliceLayout(0, word_layout))[None, :]  # [1, head_dim // 2]
    groups: gl.constexpr = head_dim // 32
    for b in gl.static_range(2):
        x5 = gl.reshape(words, [rows, groups, 2, 2, 4])  # dims (rows, r, j1, j0, c); j's bit b is dim 3 - b
        send = gl.convert_layout(gl.reshape(_swap_pairs(x5, 3 - b), [rows, head_dim // 2]), word_layout,
                                 assert_trivial=True)  # every thread sends its slot j ^ 2**b
        got = gl.inline_asm_elementwise(f"shfl.sync.bfly.b32 $0, $1, {1 << b}, 0x1f, 0xffffffff;", "=r,r",
                                        [send], dtype=gl.int32, is_pure=True, pack=1)
        keep = ((idx >> (2 + b)) & 1) == ((idx >> b) & 1)  # slot j's bit b is the lane's own
        words = gl.where(keep, words, got)
    lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [words], dtype=(gl.int16, gl.int16),
                                       is_pure=True, pack=1)
    out = gl.reshape(gl.join(lo, hi), [rows, head_dim]).to(out.dtype, bitcast=True)
    # now lane c, slot j holds columns 32r + 8c + 2j + {0, 1}: swap the c and j fields of the labels
    out = gl.permute(gl.reshape(out, [rows, groups, 4, 4, 2]), (0, 1, 3, 2, 4))
    return gl.reshape(out, [rows, head_dim])


@gluon.jit
def _consumer(descs, buffers, bars, scalars, GROUP: gl.constexpr, CAUSAL: gl.constexpr):
    q_smem, k_smem, v_smem = buffers
    q_ready, q_empty, k_ready, v_ready, kv_empty, turn, tile_ids = bars
    out_ptr, stride_ob, stride_oh, stride_ot, seq_q, seq_k, num_q_heads, group, qk_scale, num_m_blocks, num_tiles, counter_ptr = scalars
    rows: gl.constexpr = q_smem.shape[1]
    block_n: gl.constexpr = k_smem.shape[1]
    head_dim: gl.constexpr = k_smem.shape[2]
    stages: gl.constexpr = k_smem.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_n, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, head_dim, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    store_layout: gl.constexpr = _store_layout(rows, head_dim)
    shift = seq_k - seq_q
    num_bh = num_tiles // num_m_blocks
    q = q_smem.index(GROUP)  # [rows, D]
    s_init = gl.zeros([rows, block_n], gl.float32, s_layout)
    it = 0  # key blocks consumed so far, over all tiles
    tiles_done = 0
    mbarrier.wait(q_ready.index(GROUP), 0)
    t = _read_tile(tile_ids, 0)
    while t < num_tiles:
        b, h, start_m = _tile(t, num_bh, num_q_heads, num_m_blocks, 2 * rows)
        n_blocks, n_full = _blocks(start_m, seq_k, shift, rows, block_n, CAUSAL)
        row_ids = start_m + GROUP * rows + gl.arange(0, rows, layout=row_layout)  # [rows]
        last_key = gl.full([rows], seq_k - 1, gl.int32, row_layout)  # [rows]: the last key each row sees
        if CAUSAL:
            last_key = gl.minimum(last_key, row_ids + shift)
        m_i = gl.full([rows], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([rows], gl.float32, row_layout)
        acc = gl.zeros([rows, head_dim], gl.float32, o_layout)

        # block 0: QKᵀ alone
        mbarrier.wait(k_ready.index(it % stages), (it // stages) & 1)
        mbarrier.wait(turn.index(GROUP), it & 1)
        s = warpgroup_mma(q, k_smem.index(it % stages).permute((1, 0)), s_init, use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - GROUP), count=1)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        if n_blocks == 1:
            mbarrier.arrive(q_empty.index(GROUP), count=1)  # the tile's last QKᵀ is done: the next Q may land
        p, alpha, m_i, l_i = _scores_to_probabilities(s, 0, n_full, last_key, m_i, l_i, qk_scale, block_n, col_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)  # [rows, block_n] as wgmma's A operand

        for j in range(1, n_blocks):
            cur = it + j
            slot = cur % stages
            prev = (cur - 1) % stages
            mbarrier.wait(k_ready.index(slot), (cur // stages) & 1)
            mbarrier.wait(turn.index(GROUP), cur & 1)
            s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_init, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((cur - 1) // stages) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            mbarrier.arrive(turn.index(1 - GROUP), count=1)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))  # block j's scores; PV j-1 still running
            if j == n_blocks - 1:
                mbarrier.arrive(q_empty.index(GROUP), count=1)
            p, alpha, m_i, l_i = _scores_to_probabilities(s, j, n_full, last_key, m_i, l_i, qk_scale, block_n, col_layout)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            mbarrier.arrive(kv_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, o_row_layout)[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        last = it + n_blocks - 1
        mbarrier.wait(v_ready.index(last % stages), (last // stages) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last % stages), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(kv_empty.index(last % stages), count=1)

        out = acc * gl.convert_layout(1.0 / l_i, o_row_layout)[:, None]  # [rows, D]: a division a row, not an element
        out = gl.convert_layout(_columns_per_thread(out.to(dtype), rows, head_dim),
                                store_layout, assert_trivial=True)  # 8 consecutive columns a thread
        out_rows = start_m + GROUP * rows + gl.arange(0, rows, layout=gl.SliceLayout(1, store_layout))
        cols = gl.arange(0, head_dim, layout=gl.SliceLayout(0, store_layout))
        base = out_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        gl.store(base + out_rows.to(gl.int64)[:, None] * stride_ot + cols[None, :], out,
                 mask=(out_rows < seq_q)[:, None])
        it += n_blocks
        tiles_done += 1
        mbarrier.wait(q_ready.index(GROUP), tiles_done & 1)
        t = _read_tile(tile_ids, tiles_done)


@gluon.jit
def _flash_attention_gluon_kernel(
    desc_q, desc_k, desc_v, out_ptr, stride_ob, stride_oh, stride_ot,
    seq_q, seq_k, num_q_heads, group, qk_scale, num_m_blocks, num_tiles, counter_ptr,
    CAUSAL: gl.constexpr, STAGES: gl.constexpr,
):
    dtype: gl.constexpr = desc_q.dtype
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    BLOCK_N: gl.constexpr = desc_k.block_type.shape[2]
    HEAD_DIM: gl.constexpr = desc_q.block_type.shape[3]
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    tile_ids = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a slot
    fence_async_shared()
    mbarrier.arrive(turn.index(0), count=1)  # the first consumer issues first

    descs = (desc_q, desc_k, desc_v)
    buffers = (q_smem, k_smem, v_smem)
    bars = (q_ready, q_empty, k_ready, v_ready, kv_empty, turn, tile_ids)
    scalars = (out_ptr, stride_ob, stride_oh, stride_ot, seq_q, seq_k, num_q_heads, group, qk_scale, num_m_blocks, num_tiles,
               counter_ptr)
    # every partition takes the same arguments (Gluon's rule for worker partitions), each using what it needs
    gl.warp_specialize([
        (_consumer, (descs, buffers, bars, scalars, 0, CAUSAL)),
        (_consumer, (descs, buffers, bars, scalars, 1, CAUSAL)),
        (_producer, (descs, buffers, bars, scalars, 0, CAUSAL)),
    ], [4, 1], [240, 24])  # the consumers get 240 registers, the producer 24


_counters = {}  # (device index, stream) -> int32 [1]: the tile counter


def one_head_if_broadcast(k: torch.Tensor, v: torch.Tensor):
    """k/v [B, Hkv, S, D] -> the same, as one KV head where both are broadcast over heads (stride 0: the same
    K/V for every head, as the lowered models pass GQA); otherwise unchanged."""
    if k.stride(1) == 0 and v.stride(1) == 0:
        return k[:, :1], v[:, :1]
    return k, v


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A 4-D TMA descriptor over t [B, H, T, D] loading [1, 1, rows, D] boxes. A zero stride (a dim of size 1
    left by broadcasting) becomes the one a contiguous tensor would have: TMA takes no zero stride."""
    strides = list(t.stride())
    for i in (2, 1, 0):
        if strides[i] == 0:
            strides[i] = strides[i + 1] * t.shape[i + 1]
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, rows, t.shape[-1]], _BOX_LAYOUT)


def flash_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
                          causal: bool) -> torch.Tensor:
    """q [B, Hq, T, 128], k/v [B, Hkv, S, 128] (fp16/bf16, TMA-ready strides: `tma_ready`), out [B, Hq, T, 128]
    (any strides) -> out, written. K/V broadcast over heads (stride 0) are read as one head."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    k, v = one_head_if_broadcast(k, v)
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    num_m_blocks = triton.cdiv(seq_q, 2 * ROWS_PER_GROUP)
    num_tiles = num_m_blocks * batch * num_q_heads
    programs = min(num_tiles, torch.cuda.get_device_properties(q.device).multi_processor_count)
    key = (q.device.index, torch.cuda.current_stream(q.device).cuda_stream)  # launches on one stream never overlap
    counter = _counters.get(key)
    if counter is None:
        counter = _counters[key] = torch.empty(1, dtype=torch.int32, device=q.device)
    counter.zero_()  # in stream order, so CUDA graphs replay it too
    _flash_attention_gluon_kernel[(programs, )](
        _descriptor(q, ROWS_PER_GROUP), _descriptor(k, BLOCK_N), _descriptor(v, BLOCK_N),
        out, out.stride(0), out.stride(1), out.stride(2),
        seq_q, seq_k, num_q_heads, num_q_heads // num_kv_heads, scale * math.log2(math.e), num_m_blocks, num_tiles, counter,
        CAUSAL=causal, STAGES=STAGES, num_warps=4, maxnreg=168,  # 168 x 12 warps: the register file, split 240/240/24
    )
    return out
