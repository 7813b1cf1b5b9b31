"""Tests of `llmopt.passes.compress.rtn`: the canonical group-quantization layout and its error bound."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.ops.linear_wq import pack_int4, unpack_int4
from llmopt.passes.compress import fake_quantize_groups, quantize_groups

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dequant_fp32(qw):
    """Dequantizes in fp32 from the stored codes, so the bound is checked without output rounding."""
    n, k = qw.codes().shape
    q = qw.codes().float().reshape(n, k // qw.group_size, qw.group_size)
    w = (q - qw.zeros.float().unsqueeze(-1)) * qw.scales.float().unsqueeze(-1)
    return w.reshape(n, k)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 8),
    n_groups=st.integers(1, 4),
    group_size=st.sampled_from([8, 16, 32, 64]),
    bits=st.sampled_from([3, 4, 8]),
    symmetric=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from([1e-3, 1.0, 100.0]),
    shift=st.sampled_from([0.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_within_half_a_step(n, n_groups, group_size, bits, symmetric, dtype, magnitude, shift, seed):
    g = torch.Generator().manual_seed(seed)
    k = n_groups * group_size
    w = ((torch.randn(n, k, generator=g) + shift) * magnitude).to(dtype)  # shift: all-positive groups too
    qw = quantize_groups(w, bits, group_size, symmetric=symmetric)
    # layout of llmopt/ops/linear_wq.py
    assert qw.qweight.dtype == torch.uint8
    assert qw.qweight.shape == ((n, k // 2) if bits <= 4 else (n, k))
    assert qw.scales.shape == qw.zeros.shape == (n, n_groups)
    assert qw.scales.dtype == qw.zeros.dtype == dtype
    assert int(qw.codes().max()) <= 2**bits - 1
    assert torch.equal(qw.zeros, qw.zeros.round()) and bool((qw.zeros >= 0).all())
    if symmetric:
        assert bool((qw.zeros == 2 ** (bits - 1)).all())
    # every weight lies within half a quantization step of its dequantized value (fp32 rounding slack)
    err = (_dequant_fp32(qw) - w.float()).abs().reshape(n, n_groups, group_size)
    bound = qw.scales.float().unsqueeze(-1) / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-30).all()), float((err / bound).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quantize_equals_stored_dequantize(dtype, bits, symmetric):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits)).to(dtype)
    qw = quantize_groups(w, bits, 32, symmetric=symmetric)
    fake = fake_quantize_groups(w, bits, 32, symmetric=symmetric)
    assert fake.dtype == dtype
    assert torch.equal(fake, qw.dequantize())


def test_fake_quantize_accepts_leading_dims():
    w = torch.randn(3, 8, 64)
    batched = fake_quantize_groups(w, 4, 16)
    assert torch.equal(batched[1], fake_quantize_groups(w[1], 4, 16))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantized_weight_feeds_linear_wq(bits):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 64, generator=g), torch.randn(5, 64, generator=g)
    qw = quantize_groups(w, bits, 16)
    y = torch.ops.llmopt.linear_wq(x, qw.qweight, qw.scales, qw.zeros, None, qw.group_size, qw.bits)
    torch.testing.assert_close(y, x @ fake_quantize_groups(w, bits, 16).t(), rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), half_k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_int4_packing_round_trip(n, half_k, seed):
    q = torch.randint(0, 16, (n, 2 * half_k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (n, half_k) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[:, 0] & 0x0F, q[:, 0])  # element 0 in the low nibble


def test_symmetric_scale_convention():
    w = torch.tensor([[-3.0, 1.0, 0.5, 2.0]])
    qw = quantize_groups(w, 4, 4, symmetric=True)
    assert float(qw.scales) == pytest.approx(3.0 / 7)
    assert float(qw.zeros) == 8
    torch.testing.assert_close(qw.dequantize()[0, 0], torch.tensor(-3.0))  # max |w| is exact


def test_zero_group_stays_zero():
    w = torch.zeros(2, 32)
    w[1, 16:] = torch.linspace(-1, 1, 16)
    for symmetric in (False, True):
        out = quantize_groups(w, 4, 16, symmetric=symmetric).dequantize()
        assert bool(torch.isfinite(out).all())
        assert bool((out[0] == 0).all()) and bool((out[1, :16] == 0).all())


def test_clip_ratio_limits_range():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    ones = torch.ones(8, 4)
    assert torch.equal(fake_quantize_groups(w, 4, 16, clip_ratio=ones), fake_quantize_groups(w, 4, 16))
    ratio = torch.full((8, 4), 0.5)
    qw = quantize_groups(w, 4, 16, clip_ratio=ratio)
    amax = w.abs().reshape(8, 4, 16).amax(-1)  # [N, ng]
    out_max = qw.dequantize().abs().reshape(8, 4, 16).amax(-1)
    assert bool((out_max <= 0.5 * amax + qw.scales / 2 + 1e-6).all())


@pytest.mark.parametrize(
    "w, bits, group_size, kwargs, message",
    [
        (torch.randn(4, 96), 4, 64, {}, "does not divide K=96"),
        (torch.randn(4, 64), 2, 16, {}, "bits=2 is not supported"),
        (torch.randn(4, 63), 4, 63, {}, "K must be even"),
        (torch.randn(64), 4, 16, {}, "must be 2-D"),
        (torch.randint(0, 3, (4, 64)), 4, 16, {}, "float tensor"),
        (torch.randn(4, 64), 4, 16, {"clip_ratio": torch.ones(4, 3)}, "clip_ratio has shape"),
        (torch.randn(4, 64), 4, 16, {"clip_ratio": torch.zeros(4, 4)}, r"\(0, 1\]"),
    ],
)
def test_bad_requests_raise(w, bits, group_size, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_groups(w, bits, group_size, **kwargs)


@pytest.mark.parametrize("bad, name", [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf")])
def test_non_finite_weights_are_named(bad, name):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=rf"{name} values \(first at index \(2, 5\)\).*fix the weight"):
        quantize_groups(w, 4, 16)
    with pytest.raises(ValueError, match="fake_quantize_groups"):
        fake_quantize_groups(w, 4, 16)
