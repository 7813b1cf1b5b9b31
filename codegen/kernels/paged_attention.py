"""Decode attention over a paged KV cache in Triton, split over the KV length (flash-decoding).

Entry point: `paged_attention(q [B, Hq, D], k_cache [num_blocks, block_size, Hkv, D], v_cache,
block_tables [B, max_blocks] int32, seq_lens [B] int32, scale) -> out [B, Hq, D]`; the same function as
`torch.ops.llmopt.paged_attention` (llmopt/ops/paged_attention.py).

One program owns one (sequence, KV head, split): it holds all Hq // Hkv query heads of that KV head
as the rows of one tile, so each K/V row is read from memory once. It walks its split's tokens
BLOCK_N at a time, gathering rows through the block table, with an online softmax; it writes its
partial output and log-sum-exp, and a second kernel merges the splits. With one split the first
kernel writes the output directly. No host sync: the split count follows from the cache capacity
(block_tables.shape[1] * block_size) or from `max_seq_len` when the caller knows it. Head dims as for
prefill (`flash_attention.supports_head_dim`): one that is not a power of two runs in padded tiles.
"""
import functools

import torch
import triton
import triton.language as tl

from llmopt.codegen.kernels.flash_attention import rows_mask, supports_head_dim

_SPLIT_GRANULE = 256  # split lengths are multiples of this many tokens (and so of every BLOCK_N)
# Programs of the 64-token configs (head dim 128) resident on one SM: 4 (registers bound them). The split
# count keeps (sequences x KV heads x splits) within one such wave: on the H200 (132 SMs), 1.2-1.5 waves
# (e.g. 5 splits of 128 pairs, or 3 of 256) lost 10-20% of the bandwidth against one full wave.
_PROGRAMS_PER_SM = 4


def _configs():
    if triton.knobs.runtime.interpret:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # (BLOCK_N, warps, stages): on the H200, with one wave of splits, 64 tokens a step (4 programs per SM)
    # beat 128 (2 per SM) by 3-5% at B 16-64, ctx 4k-32k; 128 stays for other shapes
    shapes = [(64, 4, 2), (64, 4, 3), (64, 2, 3), (128, 4, 2), (128, 8, 3)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes]


@triton.autotune(configs=_configs(), key=["split_len", "HEAD_DIM", "GROUP_PAD", "PAGE_SIZE"], cache_results=True)
@triton.jit
def _paged_decode_kernel(
    # tensors
    q_ptr,  # [B, Hq, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, PAGE_SIZE, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D]: written when there is one split
    part_out_ptr,  # [B, Hq, num_splits, D] fp32: each split's normalized output
    part_lse_ptr,  # [B, Hq, num_splits] fp32: each split's log2-sum-exp2 of scores
    # strides; the head dim is contiguous
    stride_qb, stride_qh,
    stride_kn, stride_ks, stride_kh,
    stride_vn, stride_vs, stride_vh,
    stride_bt, stride_ob, stride_oh,
    # sizes
    num_kv_heads, qk_scale, split_len,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, ONE_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid_bh // num_kv_heads
    kv_h = pid_bh % num_kv_heads
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * split_len
    end = tl.minimum(seq_len, start + split_len)

    offs_g = tl.arange(0, GROUP_PAD)  # query heads kv_h * GROUP + g of this KV head; rows >= GROUP pad the tile
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_h * GROUP + offs_g
    head_ok = offs_g < GROUP
    head_mask = rows_mask(head_ok, offs_d, HEAD_DIM, EVEN_D)  # [GROUP_PAD, D_PAD]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=head_mask, other=0.0)

    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        token_ok = offs_n < end
        block = tl.load(table + offs_n // PAGE_SIZE, mask=token_ok, other=0).to(tl.int64)  # [BLOCK_N]
        slot = offs_n % PAGE_SIZE
        token_mask = rows_mask(token_ok, offs_d, HEAD_DIM, EVEN_D)
        k = tl.load(k_cache_ptr + block[:, None] * stride_kn + slot[:, None] * stride_ks + kv_h * stride_kh + offs_d[None, :],
                    mask=token_mask, other=0.0)  # [BLOCK_N, D_PAD]
        v = tl.load(v_cache_ptr + block[:, None] * stride_vn + slot[:, None] * stride_vs + kv_h * stride_vh + offs_d[None, :],
                    mask=token_mask, other=0.0)  # [BLOCK_N, D_PAD]
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [GROUP_PAD, BLOCK_N], log2 units
        s = tl.where(token_ok[None, :], s, float("-inf"))  # every tile holds a real token: no row is all -inf
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    nonempty = l_i > 0  # false for a split past the end of its sequence
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]  # [GROUP_PAD, D_PAD]
    if ONE_SPLIT:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask)
    else:
        row = (b * num_kv_heads * GROUP + heads) * num_splits + split  # [GROUP_PAD] into [B, Hq, num_splits]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_mask)
        tl.store(part_lse_ptr + row, tl.where(nonempty, m_i + tl.math.log2(l_safe), float("-inf")), mask=head_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,  # [B, Hq, num_splits, D] fp32
    part_lse_ptr,  # [B, Hq, num_splits] fp32
    out_ptr,  # [B, Hq, D]
    stride_ob, stride_oh, num_q_heads, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hq + h
    b = pid // num_q_heads
    h = pid % num_q_heads
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    split_ok = offs_s < num_splits
    lse = tl.load(part_lse_ptr + pid * num_splits + offs_s, mask=split_ok, other=float("-inf"))  # [SPLITS_PAD]
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # an empty sequence: every weight below is 0
    w = tl.math.exp2(lse - top)  # [SPLITS_PAD]
    parts = tl.load(part_out_ptr + (pid * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=split_ok[:, None] & d_ok[None, :], other=0.0)  # [SPLITS_PAD, D_PAD]
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [D_PAD]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests exercise the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_len(max_seq_len: int, programs: int, device: torch.device) -> int:
    """Tokens per split: as many splits as fit one wave of 4 programs per SM (rounding down, so never
    a partial second wave), none shorter than one granule."""
    want = max(1, _PROGRAMS_PER_SM * _num_sms(device) // programs)
    return max(_SPLIT_GRANULE, triton.cdiv(triton.cdiv(max_seq_len, want), _SPLIT_GRANULE) * _SPLIT_GRANULE)


def paged_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    max_seq_len: int = None,
    split_len: int = None,
) -> torch.Tensor:
    """-> out: [B, Hq, D]. `max_seq_len` bounds seq_lens (default: the block tables' capacity);
    `split_len` (tokens per split) overrides the chosen one, a multiple of 256 sized to fill one wave."""
    batch, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads or not supports_head_dim(head_dim) or k_cache.shape != v_cache.shape or k_cache.shape[-1] != head_dim:
        raise ValueError(f"paged_attention: bad shapes q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)} "
                         "(query heads a multiple of KV heads, one head dim: a multiple of 8 up to 256)")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("paged_attention: block_tables and seq_lens must be int32")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention: the head dim of q, k_cache and v_cache must be contiguous")
    group = num_q_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    max_seq_len = max_seq_len or block_tables.shape[1] * page_size
    split_len = split_len or _split_len(max_seq_len, batch * num_kv_heads, q.device)
    num_splits = triton.cdiv(max_seq_len, split_len)
    out = torch.empty_like(q)  # [B, Hq, D]
    part_out = torch.empty(batch, num_q_heads, num_splits if num_splits > 1 else 0, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, num_q_heads, num_splits if num_splits > 1 else 0, device=q.device, dtype=torch.float32)
    _paged_decode_kernel[(batch * num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        num_kv_heads, scale * 1.4426950408889634, split_len,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        PAGE_SIZE=page_size,
        ONE_SPLIT=num_splits == 1,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch * num_q_heads,)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_q_heads, num_splits,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=triton.next_power_of_2(num_splits),
        )
    return out
