"""SignRound's learned rounding (`passes/compress/learned_rounding.py`): the start is round to nearest
exactly, pruned weights stay zero, tuning lowers the loss it descends, and a loss that cannot fall leaves
the start."""
import pytest
import torch
import torch.nn.functional as F

from llmopt.passes.compress import quantize_groups
from llmopt.passes.compress.awq import search_awq_clip
from llmopt.passes.compress.learned_rounding import LearnedRounding, tune_rounding


def _layer(seed: int, n: int = 16, k: int = 64, tokens: int = 256):
    """w [n, k], x [tokens, k] with a shared offset and uneven channels, as LLM activations have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(tokens, k, generator=gen) * torch.rand(k, generator=gen).mul(3).add(0.2) + 0.5
    return w, x


@pytest.mark.parametrize("bits, symmetric, clipped", [(4, False, True), (3, False, False), (4, True, False), (8, False, True)])
def test_start_is_round_to_nearest_exactly(bits, symmetric, clipped):
    w, x = _layer(0)
    clip = search_awq_clip(x, w, bits, 16, symmetric=symmetric, separate=True) if clipped else None
    qw = quantize_groups(w, bits, 16, symmetric, clip)
    tuned = LearnedRounding(w, qw)
    again = tuned.quantized()
    assert torch.equal(again.qweight, qw.qweight) and torch.equal(again.scales, qw.scales) and torch.equal(again.zeros, qw.zeros)
    torch.testing.assert_close(tuned.weight(), qw.dequantize(), rtol=0, atol=1e-6)


def test_pruned_weights_stay_zero_whatever_the_steps():
    w, _ = _layer(1)
    w[:, ::2] = 0.0  # half the weights pruned
    tuned = LearnedRounding(w, quantize_groups(w, 4, 16))
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):  # random gradients push every offset and multiplier to its bounds
        tuned.weight().mul(torch.randn(w.shape, generator=gen)).sum().backward()
        tuned.step(0.05)
    assert (tuned.offset.abs() > 0.4).any() and (tuned.multiplier != 1).any()
    out = tuned.quantized().dequantize()
    assert (out[:, ::2] == 0).all()
    assert (tuned.weight().detach()[:, ::2] == 0).all()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("input_noise", [0.0, 0.1])
def test_tuning_lowers_a_blocks_error_below_round_to_nearest(bits, input_noise):
    """A residual SiLU MLP block, x + W2·silu(W1·x), both linears clip-searched and rounded to nearest, then
    tuned jointly on the block's output; with input noise the block reads perturbed inputs (what earlier
    quantized layers hand it) and is scored against the float block on clean ones, as AWQ's stages are.
    (On one linear alone, round to nearest under the searched clip is already hard to beat: the gain
    comes from the linears of a block correcting each other through the non-linearity.)"""
    gen = torch.Generator().manual_seed(5)
    k, hidden, tokens = 64, 128, 4096
    w1 = torch.randn(hidden, k, generator=gen) / k**0.5
    w2 = torch.randn(k, hidden, generator=gen) / hidden**0.5
    x = torch.randn(tokens, k, generator=gen) * torch.rand(k, generator=gen).mul(3).add(0.2) + 0.5
    x_seen = x + input_noise * torch.randn(tokens, k, generator=gen) * x.std(dim=0)
    target = x + F.silu(x @ w1.t()) @ w2.t()
    first = LearnedRounding(w1, quantize_groups(w1, bits, 32, clip_ratio=search_awq_clip(x_seen, w1, bits, 32)))
    hidden_seen = F.silu(x_seen @ w1.t())
    second = LearnedRounding(w2, quantize_groups(w2, bits, 32, clip_ratio=search_awq_clip(hidden_seen, w2, bits, 32)))
    inputs, targets = x_seen.split(512), target.split(512)  # 8 batches

    def loss(b):
        return (inputs[b] + F.silu(inputs[b] @ first.weight().t()) @ second.weight().t() - targets[b]).square().mean()

    with torch.no_grad():
        start = sum(float(loss(b)) for b in range(8))
    accepted, before, after = tune_rounding([first, second], loss, len(inputs), steps=50, lr=0.005)
    assert accepted and after < 0.95 * before
    with torch.no_grad():
        assert sum(float(loss(b)) for b in range(8)) < 0.95 * start  # every batch, not only the checked ones


def test_a_loss_that_cannot_fall_leaves_the_start():
    w, _ = _layer(3)
    qw = quantize_groups(w, 4, 16)
    tuned = LearnedRounding(w, qw)
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(w.shape, generator=gen) for _ in range(4)]

    def loss(b):  # the check batches (0, 1) score every step's change as worse
        return tuned.weight().mul(noise[b]).sum() + (tuned.offset.abs().sum() * 1e3 if b < 2 else 0.0)

    accepted, before, after = tune_rounding([tuned], loss, 4, steps=10, lr=0.05)
    assert not accepted and after >= before
    assert torch.equal(tuned.quantized().qweight, qw.qweight) and torch.equal(tuned.quantized().scales, qw.scales)


def test_no_batches_refused():
    w, _ = _layer(4)
    with pytest.raises(ValueError, match="no calibration batches"):
        tune_rounding([LearnedRounding(w, quantize_groups(w, 4, 16))], lambda b: torch.zeros(()), 0)
