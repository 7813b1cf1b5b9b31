"""Perplexity of a language model over a token stream, in non-overlapping windows.

Entry point: `perplexity(model_fn, token_ids, window=256)`. `model_fn` is any callable from
`input_ids [B, T]` to `logits [B, T, V]`: a compiled llmopt model, or a transformers model wrapped as
`lambda ids: model(ids).logits`.

The stream is cut into `n // window` windows (the tail that does not fill one is dropped); inside a
window each token predicts the next, so a window scores `window - 1` tokens and no context crosses
windows. This is the protocol behind the reference model's numbers in ../shared/README.md.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_tokens: int  # scored tokens: n_windows * (window - 1)
    n_windows: int


@torch.no_grad()
def perplexity(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    token_ids: torch.Tensor,
    window: int = 256,
    batch_size: int = 8,
    max_windows: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model_fn` on `token_ids [n]` over the first `max_windows` windows (all by default)."""
    if window < 2:
        raise ValueError(f"perplexity: window={window} scores no token; it needs at least 2")
    n_windows = token_ids.numel() // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"perplexity: {token_ids.numel()} tokens do not fill one window of {window}")
    windows = token_ids.reshape(-1)[: n_windows * window].view(n_windows, window)  # [N, T]
    device = token_ids.device if device is None else torch.device(device)
    total_nll = torch.zeros((), dtype=torch.float64)
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)  # [B, T]
        logits = model_fn(ids)  # [B, T, V]
        token_nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),  # [B * (T - 1), V]
            ids[:, 1:].flatten(),  # [B * (T - 1)]
            reduction="none",
        )
        total_nll += token_nll.double().sum().cpu()
    n_tokens = n_windows * (window - 1)
    nll = total_nll.item() / n_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=n_tokens, n_windows=n_windows)
