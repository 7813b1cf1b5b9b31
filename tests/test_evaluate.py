"""Perplexity: a bigram model checked by hand, and the reference model's published number."""
import math
from pathlib import Path

import pytest
import torch

from llmopt.data import tokenize_file
from llmopt.evaluate import perplexity

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"

# P[a][b]: probability that token b follows token a
BIGRAM = [
    [0.1, 0.6, 0.3],
    [0.5, 0.25, 0.25],
    [0.2, 0.7, 0.1],
]


def bigram_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """`input_ids [B, T] -> logits [B, T, 3]`: log P[token] for the next token."""
    return torch.tensor(BIGRAM).log()[input_ids]


def test_bigram_perplexity_by_hand():
    tokens = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2])  # windows [0 1 2 1] [0 2 2 1], tail 0 1 2 dropped
    scored = [(0, 1), (1, 2), (2, 1), (0, 2), (2, 2), (2, 1)]  # (1, 0) crosses windows: not scored
    probs = [BIGRAM[a][b] for a, b in scored]  # 0.6 0.25 0.7 0.3 0.1 0.7
    expected = math.prod(probs) ** (-1 / len(probs))
    for batch_size in (1, 2, 8):
        result = perplexity(bigram_logits, tokens, window=4, batch_size=batch_size, progress=False)
        assert (result.n_windows, result.n_tokens) == (2, 6)
        assert result.ppl == pytest.approx(expected, rel=1e-6)  # fp32 log-probs of exact fractions
        assert result.nll == pytest.approx(math.log(expected), rel=1e-6)
    first = perplexity(bigram_logits, tokens, window=4, max_windows=1, progress=False)
    assert first.ppl == pytest.approx((0.6 * 0.25 * 0.7) ** (-1 / 3), rel=1e-6)


def test_uniform_model_has_perplexity_of_its_vocabulary():
    tokens = torch.randint(0, 7, (1000,))
    result = perplexity(lambda ids: torch.zeros(*ids.shape, 7), tokens, window=100, progress=False)
    assert result.ppl == pytest.approx(7.0, rel=1e-6)
    assert (result.n_windows, result.n_tokens) == (10, 990)


def test_too_few_tokens_is_an_error():
    with pytest.raises(ValueError, match="one window"):
        perplexity(bigram_logits, torch.tensor([0, 1, 2]), window=4, progress=False)


@pytest.mark.slow
def test_reference_model_wikitext2_perplexity():
    """../shared/README.md: 38.2 for fp32 on CPU, first 200 windows of 256 tokens (about 30 s on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = SHARED / "models" / "ref-llama-12m"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = tokenize_file(SHARED / "data" / "wikitext-2" / "test.txt", tokenizer)  # [n]
    result = perplexity(lambda ids: model(ids).logits, tokens, window=256, max_windows=200, progress=False)
    assert result.n_windows == 200 and result.n_tokens == 200 * 255
    assert result.ppl == pytest.approx(38.2, abs=0.5)
