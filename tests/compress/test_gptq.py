"""Tests of `llmopt.passes.compress.gptq`: GPTQ rounding under quantize_groups' scales and zero points."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.passes.compress import gptq_quantize, quantize_groups


def _output_error(x, w, w_hat) -> float:
    return float((x.double() @ (w_hat.double() - w.double()).t()).pow(2).sum())


def _correlated_inputs(n, k, seed):
    """[n, K] inputs with a shared offset and mixed channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix + 0.5


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([3, 4, 8]), group_size=st.sampled_from([16, 32]), n_groups=st.integers(1, 4),
       symmetric=st.booleans(), clip=st.booleans(), seed=st.integers(0, 2**16))
def test_same_layout_and_ranges_as_rtn_and_lower_output_error(bits, group_size, n_groups, symmetric, clip, seed):
    k = group_size * n_groups
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, k, generator=g)
    x = _correlated_inputs(4 * k, k, seed)
    ratio = torch.rand(24, n_groups, generator=g) * 0.3 + 0.7 if clip else None
    rtn = quantize_groups(w, bits, group_size, symmetric, ratio)
    gq = gptq_quantize(w, x, bits, group_size, symmetric, ratio)
    assert torch.equal(gq.scales, rtn.scales) and torch.equal(gq.zeros, rtn.zeros)
    assert gq.qweight.shape == rtn.qweight.shape and gq.qweight.dtype == torch.uint8
    assert int(gq.codes().max()) <= 2**bits - 1
    # greedy column by column, so not a guaranteed minimum, but on correlated inputs it always wins by far
    assert _output_error(x, w, gq.dequantize()) < 0.9 * _output_error(x, w, rtn.dequantize())


def test_uncorrelated_inputs_give_round_to_nearest_codes():
    """A diagonal Gram matrix moves no error: the codes are RTN's exactly."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.diag(torch.rand(64, generator=g) + 0.5)  # [64, 64]: xᵀx diagonal
    assert torch.equal(gptq_quantize(w, x, 4, 32).qweight, quantize_groups(w, 4, 32).qweight)


def test_dead_inputs_and_fewer_rows_than_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    x = torch.randn(10, 64, generator=g)  # 10 rows < K = 64: rank-deficient, damping holds it
    x[:, 5] = 0  # a dead input channel
    qw = gptq_quantize(w, x, 4, 32)
    assert torch.isfinite(qw.dequantize()).all()
    assert _output_error(x, w, qw.dequantize()) <= _output_error(x, w, quantize_groups(w, 4, 32).dequantize())


def test_bad_requests_are_refused():
    w, x = torch.randn(8, 64), torch.randn(32, 64)
    with pytest.raises(ValueError, match="inputs must be"):
        gptq_quantize(w, torch.randn(32, 63), 4, 32)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, x, 4, 32, damp=0.0)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, x, 4, 48)
