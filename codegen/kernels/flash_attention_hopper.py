"""Prefill attention for Hopper (sm_90): which Hopper kernel `flash_attention` takes, and the Triton one.

Entry points:
- `choose(q, k, v, causal, kernel="auto") -> "gluon" | "warp_specialized" | None`: the Hopper kernel
  `flash_attention` takes for these operands (None: the portable kernel). Both need an sm_90 GPU,
  fp16/bf16, head dim 128, no mask, every query row seeing a key, TMA-aligned strides; "auto" prefers
  the Gluon kernel (`flash_attention_gluon`, FlashAttention-3's schedule written by hand: 1.22-1.29x
  this module's kernel on the H200, see benchmarks/RESULTS.md), then this module's;
- `run(name, q, k, v, out, scale, causal) -> out`;
- `flash_attention_ws(q [B, Hq, T, D], k [B, Hkv, S, D], v, out [B, Hq, T, D], scale, causal) -> out`.

This module's kernel: one program per 128 query rows of one head, as `flash_attention`'s kernel, but
written so that Triton's Hopper warp-specialization pass (`tl.range(..., warp_specialize=True)`) splits
it the way FlashAttention-3 is split: a producer warp group issues TMA loads of K/V blocks into a
two-stage ring in shared memory, and two consumer warp groups (64 query rows each) run QKᵀ, the online
softmax and PV. Two facts about that pass shaped the source (Triton 3.6 and 3.9, compiled for sm_90):
- it needs every load in the loop to be a TMA load, and one loop: with the causal loop split in two
  (unmasked blocks, then the diagonal) the pass fails to compile, so every block applies the key limit;
- it offsets the second consumer's copy of a value feeding the Q descriptor's coordinate, then offsets
  that consumer's row range again, so rows 64-127 would get the causal limit of rows 128-191: the
  per-row limit is therefore built from `start_m + shift`, a value the pass leaves alone.
At head dim 64 it ran 0.74x the portable kernel on the H200 (B=4, T=4096, causal), so it takes 128 only.
Because both kernels lean on young compiler features (an automatic pass; Gluon, whose API moves between
Triton releases), each (kernel, device, dtype, head dim, causal) is checked once against the portable
kernel on a small odd-sized case before first use; a mismatch, or a failure to compile or launch
(another Triton version), warns and disables that kernel for it. This module's descriptors are made on
the device, so its launches need Triton's global-scratch allocator: one backed by torch's caching
allocator is set for the launch only.
"""
import math

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from llmopt.codegen.kernels.first_use_check import passes_first_use_check

try:  # Gluon's Hopper modules: Triton >= 3.6
    from llmopt.codegen.kernels import flash_attention_gluon
except ImportError:
    flash_attention_gluon = None

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


_checked = {}  # (kernel, device index, dtype, head dim, causal) -> whether it matched the portable kernel
_ENTRY = {"gluon": "_run_gluon", "warp_specialized": "flash_attention_ws"}


def _gluon_ready(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The Gluon kernel's descriptors are made on the host over [B, H, T, D]: a dim that is stepped needs a
    nonzero stride, except K/V broadcast over heads (both), which it reads as one head."""
    if flash_attention_gluon is None or (k.stride(1) == 0) != (v.stride(1) == 0):
        return False
    k, v = flash_attention_gluon.one_head_if_broadcast(k, v)
    return all(s > 0 for t in (q, k, v) for s, n in zip(t.stride(), t.shape) if n > 1)


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kernel: str = "auto"):
    """q: [B, Hq, T, D], k/v: [B, Hkv, S, D] -> the Hopper kernel to run ("gluon" or "warp_specialized"), or
    None for the portable kernel. `kernel`: "auto" (the Gluon kernel first) or one of the two names."""
    if triton.knobs.runtime.interpret or not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return None
    seq_q, head_dim, seq_k = q.shape[2], q.shape[3], k.shape[2]
    shapes_ok = head_dim == 128 and seq_q > 0 and seq_k > 0 and (not causal or seq_k >= seq_q)  # every row sees a key
    if not (shapes_ok and q.dtype in (torch.float16, torch.bfloat16) and all(map(_tma_ready, (q, k, v)))):
        return None
    names = ("gluon", "warp_specialized") if kernel == "auto" else (kernel, )
    for name in names:
        if name == "gluon" and not _gluon_ready(q, k, v):
            continue
        key = (name, q.device.index, q.dtype, head_dim, causal)
        if key not in _checked:
            if torch.cuda.is_current_stream_capturing():  # the check syncs: run it on an eager call first
                continue
            _checked[key] = _matches_portable_kernel(name, q.device, q.dtype, head_dim, causal)
        if _checked[key]:
            return name
    return None


def run(name: str, q, k, v, out, scale: float, causal: bool) -> torch.Tensor:
    """Runs the Hopper kernel `name` (from `choose`) -> out, written."""
    return globals()[_ENTRY[name]](q, k, v, out, scale, causal)


def _run_gluon(q, k, v, out, scale, causal):
    return flash_attention_gluon.flash_attention_gluon(q, k, v, out, scale, causal)


def _matches_portable_kernel(name, device, dtype, head_dim, causal) -> bool:
    from llmopt.codegen.kernels.flash_attention import flash_attention

    gen = torch.Generator(device=device).manual_seed(0)
    # partial 128-row tiles at both ends, GQA 4:1; on a GPU 144 tiles, so the Gluon kernel's programs (one an SM)
    # each take several; under the interpreter (tests on CPU) a small case
    seq_q, seq_k = (1100, 1230) if causal else (1100, 1360)
    heads = 8
    if triton.knobs.runtime.interpret:
        seq_q, seq_k, heads = seq_q // 5, seq_k // 5, 4
    q = torch.randn(2, heads, seq_q, head_dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(2, heads // 4, seq_k, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
    scale = head_dim**-0.5
    ref = flash_attention(q, k, v, scale, causal, kernel="portable").float()
    label = {"gluon": "Gluon", "warp_specialized": "warp-specialized"}[name]
    where = f"on this GPU and Triton {triton.__version__} ({dtype}, head dim {head_dim}, causal={causal})"
    # the two kernels differ by rounding only (~1e-3 in bf16)
    return passes_first_use_check(f"{label} attention kernel", where,
                                  lambda: run(name, q, k, v, torch.empty_like(ref, dtype=dtype), scale, causal), ref,
                                  2e-2, "portable kernel", "not using it for these calls", stacklevel=3)


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
