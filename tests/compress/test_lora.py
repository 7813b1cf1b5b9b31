"""Tests of `llmopt.passes.compress.lora`: exact merges and the QLoRA requantization error."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.passes.compress import merge_lora, quantize_groups, requantize_merged


def _lora(n, k, r, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, k, generator=g).to(dtype),
        torch.randn(r, k, generator=g).to(dtype) * 0.1,
        torch.randn(n, r, generator=g).to(dtype) * 0.1,
    )


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 32),
    k=st.integers(1, 32),
    r=st.integers(1, 8),
    scaling=st.floats(-4, 4),
    seed=st.integers(0, 2**16),
)
def test_merge_is_exact_in_fp32(n, k, r, scaling, seed):
    w, a, b = _lora(n, k, r, seed)
    merged = merge_lora(w, a, b, scaling)
    expected = w.double() + scaling * (b.double() @ a.double())
    # fp32 rounding of one r-term dot product and one add
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_accumulates_in_fp32_and_casts_once(dtype):
    w, a, b = _lora(16, 32, 4, dtype=dtype)
    merged = merge_lora(w, a, b, 2.0)
    assert merged.dtype == dtype
    assert torch.equal(merged, (w.float() + 2.0 * (b.float() @ a.float())).to(dtype))


def test_zero_adapter_leaves_weight_unchanged():
    w, a, _ = _lora(8, 16, 2)
    assert torch.equal(merge_lora(w, a, torch.zeros(8, 2), 1.0), w)


@pytest.mark.parametrize("bits, symmetric", [(3, False), (4, False), (4, True), (8, False)])
def test_requantized_merge_error_is_reported_and_bounded(bits, symmetric):
    w, a, b = _lora(32, 128, 8, seed=bits)
    qw = quantize_groups(w, bits, 32, symmetric=symmetric)
    merged_q, added_error = requantize_merged(qw, a, b, 0.5)
    assert (merged_q.bits, merged_q.group_size, merged_q.symmetric) == (bits, 32, symmetric)
    assert merged_q.scales.dtype == qw.scales.dtype and merged_q.qweight.shape == qw.qweight.shape
    exact = qw.dequantize().float() + 0.5 * (b @ a)  # [N, K] the exact merged weight
    got = merged_q.dequantize().float()
    assert added_error == pytest.approx(float((got - exact).norm() / exact.norm()), rel=1e-5)
    # every element within half a step: ‖error‖_F <= sqrt(Σ_g G·(s_g/2)²)
    bound = float((merged_q.scales.float() / 2).pow(2).sum().mul(32).sqrt() / exact.norm())
    assert 0 < added_error <= bound * (1 + 1e-5)


def test_requantizing_without_adapter_changes_little():
    w, a, _ = _lora(32, 128, 4)
    qw = quantize_groups(w, 4, 32)
    _, added_error = requantize_merged(qw, a, torch.zeros(32, 4), 1.0)
    assert added_error < 1e-6  # a quantized weight sits on its own grid


def test_shape_mismatch_raises():
    w, a, b = _lora(8, 16, 2)
    with pytest.raises(ValueError, match="do not chain"):
        merge_lora(w, a[:, :8], b, 1.0)
    with pytest.raises(ValueError, match="do not chain"):
        merge_lora(w, a, b.t(), 1.0)
    with pytest.raises(ValueError, match="expected w"):
        merge_lora(w[0], a, b, 1.0)
