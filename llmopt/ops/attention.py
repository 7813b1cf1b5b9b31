"""`torch.ops.llmopt.attention`: scaled dot-product attention with GQA and no K/V repeat.

q: `[B, Hq, T, D]`, k and v: `[B, Hkv, S, D]` with Hq a multiple of Hkv (query head h reads KV head
h // (Hq // Hkv)). `mask`: optional boolean `[B or 1, 1, T, S]` (True = attend) or an additive float
mask; with `causal=True` and no mask the usual lower-triangular mask aligned to the end is used.
FuseAttention rewrites SDPA and matmul-softmax-matmul subgraphs into this op.
"""
from typing import Optional

import torch


@torch.library.custom_op("llmopt::attention", mutates_args=())
def attention(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # reference only: kernels never materialize this
    v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, Hq, T, S]
    t, s = q.shape[2], k.shape[2]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    elif causal:
        keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows (padding) give zeros, not NaN
    return (probs @ v.float()).to(q.dtype)


@attention.register_fake
def _(q, k, v, mask, scale, causal):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
