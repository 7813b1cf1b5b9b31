"""`torch.ops.llmopt.paged_attention`: decode attention (one new token per sequence) over a paged KV cache.

Entry point: `paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)`, registered
as the op `llmopt::paged_attention`.

q: `[B, Hq, D]`; k_cache and v_cache: `[num_blocks, block_size, Hkv, D]`; block_tables: `[B, max_blocks]`
int32, entry i of row b naming the cache block that holds tokens i*block_size .. (i+1)*block_size - 1
of sequence b; seq_lens: `[B]` int32, how many cached tokens sequence b attends to (the new token's
K/V already written). Query head h reads KV head h // (Hq // Hkv). A sequence of length 0 gives zeros.
"""
import torch


@torch.library.custom_op("llmopt::paged_attention", mutates_args=())
def paged_attention_reference(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = q.shape[1] // num_kv_heads
    out = torch.zeros_like(q)  # [B, Hq, D]
    for b, seq_len in enumerate(seq_lens.tolist()):  # reference only: one sequence at a time
        if seq_len == 0:
            continue
        pos = torch.arange(seq_len, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(groups, dim=1)  # [L, Hq, D]
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(groups, dim=1)  # [L, Hq, D]
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale  # [Hq, L]
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v).to(q.dtype)
    return out


@paged_attention_reference.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale):
    return torch.empty_like(q)
