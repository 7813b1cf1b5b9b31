"""Prefill attention for Hopper (sm_90): TMA loads and Triton's automatic warp specialization.

Entry points:
- `usable(q, k, v, causal) -> bool`: whether `flash_attention` may take this path (an sm_90 GPU,
  fp16/bf16, head dim 128, no mask, every query row sees a key, TMA-aligned strides);
- `flash_attention_ws(q [B, Hq, T, D], k [B, Hkv, S, D], v, out [B, Hq, T, D], scale, causal) -> out`.

One program per 128 query rows of one head, as `flash_attention`'s kernel, but written so that
Triton's Hopper warp-specialization pass (`tl.range(..., warp_specialize=True)`) splits it the way
FlashAttention-3 is split: a producer warp group issues TMA loads of K/V blocks into a two-stage ring in
shared memory, and two consumer warp groups (64 query rows each) run QKᵀ, the online softmax and PV.
Two facts about that pass shaped the source (Triton 3.6 and 3.9, compiled for sm_90):
- it needs every load in the loop to be a TMA load, and one loop: with the causal loop split in two
  (unmasked blocks, then the diagonal) the pass fails to compile, so every block applies the key limit;
- it offsets the second consumer's copy of a value feeding the Q descriptor's coordinate, then offsets
  that consumer's row range again, so rows 64-127 would get the causal limit of rows 128-191: the
  per-row limit is therefore built from `start_m + shift`, a value the pass leaves alone.
At head dim 64 it ran 0.74x the portable kernel on the H200 (B=4, T=4096, causal), so it takes 128 only.
Because the path leans on a compiler pass with such edges, each (device, dtype, head dim, causal) is
checked once against the portable kernel on a small odd-sized case before first use; a mismatch, or a
failure to compile or launch (another Triton version), warns and disables this path for it. Descriptors are made on the device, so launches need Triton's global-scratch
allocator: one backed by torch's caching allocator is set for the launch only.
"""
import math
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES = 128, 128, 4, 2  # 64-key tiles with 3+ stages gave NaN on 3.6


@triton.jit
def _flash_attention_ws_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    seq_q, seq_k, num_q_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASK_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal tiles first
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    kv_h = h // group
    # one [tokens, D] view per (batch, head); rows past the end load as zeros and are never stored
    desc_q = tl.make_tensor_descriptor(q_ptr + b * stride_qb + h * stride_qh, shape=[seq_q, HEAD_DIM],
                                       strides=[stride_qt, 1], block_shape=[BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(k_ptr + b * stride_kb + kv_h * stride_kh, shape=[seq_k, HEAD_DIM],
                                       strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(v_ptr + b * stride_vb + kv_h * stride_vh, shape=[seq_k, HEAD_DIM],
                                       strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    desc_o = tl.make_tensor_descriptor(out_ptr + b * stride_ob + h * stride_oh, shape=[seq_q, HEAD_DIM],
                                       strides=[stride_ot, 1], block_shape=[BLOCK_M, HEAD_DIM])
    start_m = pid_m * BLOCK_M
    q = desc_q.load([start_m, 0])  # [BLOCK_M, D]

    shift = seq_k - seq_q  # causal: query i sees keys j <= i + shift
    hi = seq_k
    last_key = tl.zeros([BLOCK_M], tl.int32) + (seq_k - 1)  # [BLOCK_M]: the last key each row sees
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M + shift)
        last_key = tl.minimum(last_key, tl.arange(0, BLOCK_M) + (start_m + shift))  # not offs_m: see the docstring

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        k = desc_k.load([start_n, 0])  # [BLOCK_N, D]
        qk = tl.dot(q, k.T)  # [BLOCK_M, BLOCK_N], unscaled
        if MASK_KEYS:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            qk = tl.where(offs_n[None, :] <= last_key[:, None], qk, -1.0e6)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # log2 units
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([start_n, 0])  # [BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    desc_o.store([start_m, 0], (acc / l_i[:, None]).to(q.dtype))


def _tma_ready(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte-aligned base, 16-byte multiples for every stride but the last (1), and a
    token stride that moves (batch and head strides only offset the base, so broadcast ones are fine)."""
    return (t.stride(-1) == 1 and t.stride(-2) > 0 and t.data_ptr() % 16 == 0
            and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


_checked = {}  # (device index, dtype, head dim, causal) -> whether this path matched the portable kernel


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """q: [B, Hq, T, D], k/v: [B, Hkv, S, D]. False sends the call to the portable kernel."""
    if triton.knobs.runtime.interpret or not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    seq_q, head_dim, seq_k = q.shape[2], q.shape[3], k.shape[2]
    shapes_ok = head_dim == 128 and seq_q > 0 and seq_k > 0 and (not causal or seq_k >= seq_q)  # every row sees a key
    if not (shapes_ok and q.dtype in (torch.float16, torch.bfloat16) and all(map(_tma_ready, (q, k, v)))):
        return False
    key = (q.device.index, q.dtype, head_dim, causal)
    if key not in _checked:
        if torch.cuda.is_current_stream_capturing():  # the check syncs: run it on an eager call first
            return False
        _checked[key] = _matches_portable_kernel(q.device, q.dtype, head_dim, causal)
    return _checked[key]


def _matches_portable_kernel(device, dtype, head_dim, causal) -> bool:
    from llmopt.codegen.kernels.flash_attention import flash_attention

    gen = torch.Generator(device=device).manual_seed(0)
    seq_q, seq_k = (200, 330) if causal else (200, 460)  # partial 128-row tiles at both ends; GQA 4:1
    q = torch.randn(2, 4, seq_q, head_dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(2, 1, seq_k, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
    scale = head_dim**-0.5
    ref = flash_attention(q, k, v, scale, causal, kernel="portable").float()
    where = f"on this GPU and Triton {triton.__version__} ({dtype}, head dim {head_dim}, causal={causal})"
    try:  # another Triton may not compile it: the pass it relies on is young
        out = flash_attention_ws(q, k, v, torch.empty_like(ref, dtype=dtype), scale, causal).float()
    except Exception as err:  # noqa: BLE001  (any compile or launch failure means: do not use this path)
        detail = (str(err).strip().splitlines() or [""])[-1][:200]  # Triton's last line names the failure
        warnings.warn(f"llmopt: the warp-specialized attention kernel failed {where}: {type(err).__name__}: {detail}; "
                      "using the portable kernel for these calls.", RuntimeWarning, stacklevel=3)
        return False
    err = ((out - ref).norm() / ref.norm()).item()
    if not err < 2e-2:  # catches NaN too; the two kernels differ by rounding only (~1e-3 in bf16)
        warnings.warn(f"llmopt: the warp-specialized attention kernel gives a relative error of {err:.2e} against the portable "
                      f"kernel {where}; using the portable kernel for these calls.", RuntimeWarning, stacklevel=3)
        return False
    return True


def flash_attention_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
                       causal: bool) -> torch.Tensor:
    """q/out: [B, Hq, T, D] (any TMA-ready strides), k/v: [B, Hkv, S, D] -> out, written."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    block_m, block_n = (16, 16) if triton.knobs.runtime.interpret else (BLOCK_M, BLOCK_N)
    scratch = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=q.device)  # noqa: E731
    token = _allocation._allocator.set(scratch)  # the descriptors' global scratch, for this launch only
    try:
        _flash_attention_ws_kernel[(triton.cdiv(seq_q, block_m), batch * num_q_heads)](
            q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            seq_q, seq_k, num_q_heads, num_q_heads // num_kv_heads, scale * math.log2(math.e),
            HEAD_DIM=head_dim, CAUSAL=causal, MASK_KEYS=causal or seq_k % block_n != 0, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    finally:
        _allocation._allocator.reset(token)
    return out
