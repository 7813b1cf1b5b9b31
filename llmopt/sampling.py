"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p.

Entry point: `sample_next(logits [B, V], do_sample, temperature, top_k, top_p, generator) -> [B]`;
`check_sampling_options(temperature, top_k, top_p)` refuses options it cannot sample with.
"""
import numbers

import torch

from llmopt.errors import LlmoptError


def check_sampling_options(temperature, top_k, top_p) -> None:
    """LlmoptError naming the option when sampling with these could not work (top_k 0 or None: no top-k;
    top_p None or 1: no top-p)."""
    if not temperature > 0:
        raise LlmoptError(f"temperature must be > 0 when sampling (got {temperature}); use do_sample=False for greedy")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise LlmoptError(f"top_k must be an integer >= 1 (or 0 / None for no top-k); got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise LlmoptError(f"top_p must lie in (0, 1] (the probability mass kept; 1 or None for no top-p); got {top_p!r}")


def sample_next(logits, do_sample=False, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    check_sampling_options(temperature, top_k, top_p)
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
