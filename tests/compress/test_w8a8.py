"""Tests of `llmopt.passes.compress.w8a8`: per-channel int8 weights, SmoothQuant scales and alpha search."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.ops.linear_w8a8 import quantize_per_token, quantize_static
from llmopt.passes.compress import (
    quantize_weight_per_channel,
    search_smooth_alpha,
    smooth_scales,
    static_act_scale,
)
from llmopt.passes.compress.w8a8 import DEFAULT_ALPHAS


def _outlier_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    x[:, [5, 17, 42]] *= 40  # outlier channels: per-token int8 loses the small ones
    return x, [torch.randn(48, 64, generator=g) * 0.05, torch.randn(16, 64, generator=g) * 0.05]


def _w8a8_error(x, weights, s) -> float:
    """Σ_i ‖Q_tok(x/s)·Q_ch(W_i·s)ᵀ - x·W_iᵀ‖² (fp64), with the op's own quantizers."""
    qx, sx = quantize_per_token(x / s)
    total = 0.0
    for w in weights:
        qw, sw = quantize_weight_per_channel(w * s)
        y = (qx.double() * sx.double()) @ (qw.double() * sw.double().unsqueeze(1)).t()
        total += float((y - x.double() @ w.double().t()).pow(2).sum())
    return total


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 16),
    k=st.integers(1, 64),
    magnitude=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_weight_round_trip_within_half_a_step(n, k, magnitude, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * magnitude
    q, scale = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == (n, k) and scale.dtype == torch.float32 and scale.shape == (n,)
    assert int(q.abs().max()) == 127  # the largest weight of each row uses the full range
    err = (q.float() * scale.unsqueeze(1) - w).abs()
    assert bool((err <= scale.unsqueeze(1) / 2 * (1 + 1e-5)).all())


def test_weight_quantization_feeds_linear_w8a8():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 64, generator=g), torch.randn(24, 64, generator=g)
    q, scale = quantize_weight_per_channel(w)
    y = torch.ops.llmopt.linear_w8a8(x, q, scale, None, None)
    qx, sx = quantize_per_token(x)
    expected = (qx.double() * sx.double()) @ (q.double() * scale.double().unsqueeze(1)).t()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_smooth_scales_balance_as_the_formula_says(alpha):
    x, weights = _outlier_case()
    act_absmax = x.abs().amax(0)  # [K]
    s = smooth_scales(act_absmax, weights, alpha)
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)  # [K]
    m = act_absmax * w_absmax  # the product smoothing redistributes
    x_side = (x / s).abs().amax(0)
    w_side = torch.stack([(w * s).abs().amax(0) for w in weights]).amax(0)
    torch.testing.assert_close(x_side, m.pow(1 - alpha), rtol=1e-5, atol=0)
    torch.testing.assert_close(w_side, m.pow(alpha), rtol=1e-5, atol=0)
    if alpha == 0.5:
        torch.testing.assert_close(x_side, w_side, rtol=1e-5, atol=0)


def test_smooth_scales_are_finite_for_dead_channels():
    weights = [torch.randn(8, 4)]
    weights[0][:, 2] = 0
    s = smooth_scales(torch.tensor([1.0, 0.0, 0.0, 1e30]), weights, 0.5)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert float(s.min()) >= 1e-5 and float(s.max()) <= 1e5


def test_alpha_search_picks_the_grid_minimum_and_beats_no_smoothing():
    x, weights = _outlier_case()
    alpha = search_smooth_alpha(x, weights)
    assert alpha in DEFAULT_ALPHAS
    act_absmax = x.abs().amax(0)
    errors = {a: _w8a8_error(x, weights, smooth_scales(act_absmax, weights, a)) for a in DEFAULT_ALPHAS}
    assert errors[alpha] == pytest.approx(min(errors.values()), rel=1e-4)
    unsmoothed = _w8a8_error(x, weights, torch.ones(64))
    assert errors[alpha] < 0.5 * unsmoothed, (errors[alpha], unsmoothed)


def test_alpha_search_uses_a_custom_grid():
    x, weights = _outlier_case()
    assert search_smooth_alpha(x, weights, grid=(0.25,)) == 0.25


def test_static_act_scale_covers_the_calibrated_range():
    act_absmax = torch.tensor([0.5, 3.0, 2.0])
    scale = static_act_scale(act_absmax)
    assert scale.shape == (1,) and scale.dtype == torch.float32
    assert float(scale) == pytest.approx(3.0 / 127)
    q = quantize_static(torch.tensor([[3.0, -3.0, 1.0]]), scale)
    assert q.tolist() == [[127, -127, 42]]


def test_bad_inputs_raise():
    x, weights = _outlier_case()
    act = x.abs().amax(0)
    with pytest.raises(ValueError, match="alpha=1.5"):
        smooth_scales(act, weights, 1.5)
    with pytest.raises(ValueError, match="finite and >= 0"):
        smooth_scales(-act, weights, 0.5)
    with pytest.raises(ValueError, match="expected K=64"):
        smooth_scales(act, [torch.randn(4, 32)], 0.5)
    with pytest.raises(ValueError, match="no weights"):
        search_smooth_alpha(x, [])
    with pytest.raises(ValueError, match="empty alpha grid"):
        search_smooth_alpha(x, weights, grid=())
    with pytest.raises(ValueError, match="2-D float"):
        quantize_weight_per_channel(torch.randn(8))
    nan_w = torch.randn(4, 64)
    nan_w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight_per_channel(nan_w)
    with pytest.raises(ValueError, match="non-empty and finite"):
        static_act_scale(torch.tensor([float("inf")]))
