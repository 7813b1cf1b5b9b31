"""Prefill attention in Triton, FlashAttention-2 style (online softmax, one pass over K/V).

Entry points:
- `flash_attention(q [B, Hq, T, D], k [B, Hkv, S, D], v, scale, causal, mask=None, kernel="auto")`: the padded batch;
  same function as `torch.ops.llmopt.attention(q, k, v, mask, scale, causal)`, with `mask` a boolean
  [B or 1, Hq or 1, T, S] (True = attend; packed or shifted sequences) or None. With a mask every KV
  block runs masked, `causal` is ignored (as in the reference), and a row that may attend to no key
  gives zeros.
- `flash_attention_varlen(q [total_T, Hq, D], k [total_S, Hkv, D], v, cu_seqlens_q, cu_seqlens_k,
  max_seqlen_q, scale, causal)`: a ragged batch, sequence b owning rows cu_seqlens[b]:cu_seqlens[b+1].

Both launch one kernel: this module's portable one, or, for `flash_attention` on an sm_90 GPU
(fp16/bf16, head dim 128, no mask), a Hopper one that `flash_attention_hopper.choose` picks (the Gluon
kernel of `flash_attention_gluon`, else Triton's warp-specialized one).
GQA: query head h reads KV head h // (Hq // Hkv); K/V are never repeated.
Head dims: any multiple of 8 up to 256 (`supports_head_dim`); one that is not a power of two (Phi-3's
96, Phi-2's 80) runs in tiles padded to the next one, the padding loaded as zeros and never stored.
Causal is aligned to the end (query i of T sees keys j <= i + S - T); query rows that see no key give
zeros, as the reference does. KV blocks above the diagonal are skipped; blocks fully below it run
without masks. fp16/bf16 operands accumulate in fp32; fp32 operands use IEEE dots.
"""
import math

import torch
import triton
import triton.language as tl

from llmopt.codegen.kernels import flash_attention_hopper

_MASKED = tl.constexpr(-1.0e6)  # finite, so a row with every key of a block masked stays NaN-free


# (BLOCK_M, BLOCK_N, warps, stages); none spills at head dim 128 on sm_90 (ptxas, via cuobjdump -res-usage)
_SHAPES = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)]
# head dims above 128 (Gemma's 256): K/V tiles of 64 x 256 take 32 KB each a stage; the three best of ten
# configs swept on the H200 at B=4 T=4096 D=256 H=16 (1.20 / 1.36 / 1.49 ms; 64 x 128 tiles do not fit)
_WIDE_SHAPES = [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)]


def _configs():
    if triton.knobs.runtime.interpret:  # one small config: the interpreter runs each program in Python
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _SHAPES + _WIDE_SHAPES]


def _prune(configs, named_args, **kwargs):
    """Head dims above 128 get the configs made for them, the others the rest; short queries waste most
    of a 128-row tile: keep the 64-row tiles for them."""
    args = {**named_args, **kwargs}
    wide = args["HEAD_DIM_PAD"] > 128
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    configs = [c for c in configs if (shape(c) in _WIDE_SHAPES) == wide] or configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] <= 64]
    return small if args["seq_bucket"] <= 64 and small else configs


@triton.jit
def rows_mask(rows_ok, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """rows_ok [R] -> the mask of a [R, D_PAD] tile: its rows, and without EVEN_D the real head-dim columns."""
    if EVEN_D:
        mask = rows_ok[:, None]
    else:
        mask = rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q,  # acc: [BLOCK_M, D] fp32, l_i/m_i: [BLOCK_M] fp32, q: [BLOCK_M, D]
    k_base, v_base, stride_kt, stride_vt,
    offs_m, offs_d, lo, hi, seq_q, seq_k, causal_shift, qk_scale, mask_base, stride_mt,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Online softmax over keys [lo, hi) in log2 units; MASKED blocks check key bounds and the causal
    diagonal, and with HAS_MASK the user's mask (its key stride is 1), its masked scores -inf so that a
    row with no key left keeps l = 0; without EVEN_D the padded head-dim columns load as zeros."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            kv_mask = rows_mask(offs_n < seq_k, offs_d, HEAD_DIM, EVEN_D)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], unscaled
        if MASKED:
            keep = (offs_n < seq_k)[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            if HAS_MASK:
                in_bounds = (offs_m < seq_q)[:, None] & (offs_n < seq_k)[None, :]
                allowed = tl.load(mask_base + offs_m[:, None] * stride_mt + offs_n[None, :], mask=in_bounds, other=0)
                qk = tl.where(keep & (allowed != 0), qk, float("-inf"))
            else:
                qk = tl.where(keep, qk, _MASKED)
        # the scale goes into the exponent: one FMA per score instead of a multiply and a subtract
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # log2 units
        if HAS_MASK:  # a row with every key masked so far: exponents against 0, so p = alpha = 0, not NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(), key=["seq_bucket", "HEAD_DIM", "CAUSAL", "HAS_MASK"], prune_configs_by={"early_config_prune": _prune},
                  cache_results=True)
@triton.jit
def _flash_attention_kernel(
    # tensors: q/out [.., T, Hq, D]-like, k/v [.., S, Hkv, D]-like, addressed through the strides below
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_q, cu_seqlens_k, mask_ptr,
    # strides (batch, token, head); the head dim is contiguous
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_mb, stride_mh, stride_mt,  # the mask's (batch, query head, query); its key stride is 1
    # sizes: padded batches use seq_q/seq_k for every sequence; varlen reads cu_seqlens
    seq_q, seq_k, num_q_heads, group, qk_scale,
    seq_bucket,  # next power of two of the longest query: the autotune key, so tuning is per bucket
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD
    # longest tiles first: in the causal case the last query block of a head does the most work
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    kv_h = h // group
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + h * stride_qh
    k_base = k_ptr + b64 * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b64 * stride_vb + kv_h * stride_vh
    o_base = out_ptr + b64 * stride_ob + h * stride_oh
    mask_base = mask_ptr + b64 * stride_mb + h * stride_mh
    if VARLEN:
        q_start = tl.load(cu_seqlens_q + b).to(tl.int64)
        seq_q = (tl.load(cu_seqlens_q + b + 1) - q_start).to(tl.int32)
        k_start = tl.load(cu_seqlens_k + b).to(tl.int64)
        seq_k = (tl.load(cu_seqlens_k + b + 1) - k_start).to(tl.int32)
        q_base += q_start * stride_qt
        k_base += k_start * stride_kt
        v_base += k_start * stride_vt
        o_base += q_start * stride_ot
    start_m = pid_m * BLOCK_M
    if start_m >= seq_q:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    io_mask = rows_mask(offs_m < seq_q, offs_d, HEAD_DIM, EVEN_D)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=io_mask, other=0.0)  # [BLOCK_M, D_PAD]

    causal_shift = seq_k - seq_q  # query i sees keys j <= i + causal_shift
    full_end = (seq_k // BLOCK_N) * BLOCK_N  # keys below this need no bounds check
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, tl.maximum(start_m + BLOCK_M + causal_shift, 0))
        first_row_sees = tl.maximum(start_m + causal_shift + 1, 0)  # keys visible to every row
        full_end = tl.minimum(full_end, (first_row_sees // BLOCK_N) * BLOCK_N)
    if HAS_MASK:
        full_end = 0  # every block reads the mask

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_d, 0, full_end, seq_q, seq_k, causal_shift, qk_scale, mask_base, stride_mt,
                                   False, CAUSAL, BLOCK_N, PRECISION, HEAD_DIM, EVEN_D, HAS_MASK)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_d, full_end, hi, seq_q, seq_k, causal_shift, qk_scale, mask_base, stride_mt,
                                   True, CAUSAL, BLOCK_N, PRECISION, HEAD_DIM, EVEN_D, HAS_MASK)

    sees_keys = l_i > 0  # false only where no key exists (seq_k == 0) or the mask allows none ...
    if CAUSAL:
        sees_keys = sees_keys & (offs_m + causal_shift >= 0)  # ... or the row precedes every key (T > S)
    out = tl.where(sees_keys[:, None], acc / tl.where(sees_keys, l_i, 1.0)[:, None], 0.0)
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernel takes this head dim: a multiple of 8 (16-byte rows in 16-bit types) up to 256."""
    return 8 <= head_dim <= 256 and head_dim % 8 == 0


def supports(q, k, v, mask=None) -> bool:
    """Whether `flash_attention` takes these operands (one supported head dim and one dtype) and mask
    (None or a 4-D boolean one); else a caller runs the reference op."""
    head_dim = q.shape[-1]
    mask_ok = mask is None or (mask.dtype == torch.bool and mask.dim() == 4)
    return supports_head_dim(head_dim) and k.shape[-1] == v.shape[-1] == head_dim and q.dtype == k.dtype == v.dtype and mask_ok


def _check(q, k, v):
    head_dim = q.shape[-1]
    if not supports_head_dim(head_dim) or k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"flash_attention: q, k and v need one head dim, a multiple of 8 up to 256; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] % k.shape[1]:  # dim 1 holds the heads in both layouts ([B, H, T, D] and varlen's [total, H, D])
        raise ValueError(f"flash_attention: {q.shape[1]} query heads is not a multiple of {k.shape[1]} KV heads")


def _launch(q, k, v, out, cu_q, cu_k, strides, seq_q, seq_k, batch, num_q_heads, num_kv_heads, max_seqlen_q, scale, causal, varlen,
            mask=None):
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * num_q_heads)
    mask_strides = [mask.stride(0), mask.stride(1), mask.stride(2)] if mask is not None else [0, 0, 0]
    _flash_attention_kernel[grid](
        q, k, v, out, cu_q, cu_k, q if mask is None else mask, *strides, *mask_strides,
        seq_q, seq_k, num_q_heads, num_q_heads // num_kv_heads, scale * math.log2(math.e),
        triton.next_power_of_2(max(max_seqlen_q, 1)),
        HEAD_DIM=q.shape[-1], HEAD_DIM_PAD=max(16, triton.next_power_of_2(q.shape[-1])), CAUSAL=causal, VARLEN=varlen,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_MASK=mask is not None,
    )
    return out


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                    mask: torch.Tensor = None, kernel: str = "auto") -> torch.Tensor:
    """q: [B, Hq, T, D], k/v: [B, Hkv, S, D], mask: None or bool [B or 1, Hq or 1, T, S] -> out:
    [B, Hq, T, D] (the dtype of q), stored token-major ([B, T, Hq, D] memory, as a transposed view): the
    models' next step, `out.transpose(1, 2)` then a reshape to [B, T, Hq·D] for o_proj, is then a free
    view and o_proj's input is read contiguously. `kernel`: "auto" takes the warp-specialized Hopper
    kernel (`flash_attention_hopper`) where it is usable and this module's portable kernel elsewhere;
    "portable", "gluon" or "warp_specialized" force one (the Hopper ones raise where they are not usable)."""
    _check(q, k, v)
    if kernel not in ("auto", "portable", "gluon", "warp_specialized"):
        raise ValueError(f"flash_attention: kernel must be 'auto', 'portable', 'gluon' or 'warp_specialized', got {kernel!r}")
    batch, num_q_heads, seq_q, head_dim = q.shape
    out = torch.empty(batch, seq_q, num_q_heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, T, D]
    hopper = flash_attention_hopper.choose(q, k, v, causal, kernel) if kernel != "portable" and mask is None else None
    if hopper is not None:
        return flash_attention_hopper.run(hopper, q, k, v, out, scale, causal)
    if kernel in ("gluon", "warp_specialized"):
        raise ValueError(f"flash_attention: the {kernel} kernel needs an sm_90 GPU, fp16/bf16, head dim 128, no mask, "
                         "S >= T when causal and 16-byte-aligned strides (and to have passed its check on this GPU); "
                         "use kernel='auto' to fall back to the portable kernel")
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (q.shape[2], k.shape[2]):
            raise ValueError(f"flash_attention: mask must be bool [B or 1, Hq or 1, T, S], got {mask.dtype} {tuple(mask.shape)}")
        mask = mask if mask.stride(-1) == 1 else mask.contiguous()  # before broadcasting: only the given dims are copied
        mask = mask.expand(q.shape[0], q.shape[1], -1, -1)  # broadcast dims get stride 0
        causal = False  # the mask says everything, as in the reference
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    strides = [q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
               v.stride(0), v.stride(2), v.stride(1), out.stride(0), out.stride(2), out.stride(1)]
    return _launch(q, k, v, out, q, k, strides, seq_q, seq_k, batch, num_q_heads, num_kv_heads, seq_q, scale, causal, False, mask)


def flash_attention_varlen(
    q: torch.Tensor,  # [total_T, Hq, D]
    k: torch.Tensor,  # [total_S, Hkv, D]
    v: torch.Tensor,  # [total_S, Hkv, D]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    cu_seqlens_k: torch.Tensor,  # [B + 1] int32
    max_seqlen_q: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Ragged batch in one launch -> out: [total_T, Hq, D]. No host sync: max_seqlen_q sizes the grid."""
    _check(q, k, v)
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32 or cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError("flash_attention_varlen: cu_seqlens_q and cu_seqlens_k must be int32 [B + 1] each")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)  # [total_T, Hq, D]
    strides = [0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1),
               0, v.stride(0), v.stride(1), 0, out.stride(0), out.stride(1)]
    batch = cu_seqlens_q.shape[0] - 1
    return _launch(q, k, v, out, cu_seqlens_q, cu_seqlens_k, strides, 0, 0, batch, q.shape[1], k.shape[1],
                   max_seqlen_q, scale, causal, True)
