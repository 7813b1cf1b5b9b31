"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p.

Entry point: `sample_next(logits [B, V], do_sample, temperature, top_k, top_p, generator) -> [B]`.
"""
import torch

from llmopt.errors import LlmoptError


def sample_next(logits, do_sample=False, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise LlmoptError(f"temperature must be > 0 when sampling (got {temperature}); use do_sample=False for greedy")
    logits = logits.float() / temperature  # [B, V]
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the first token always
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
