"""Tests of `llmopt.passes.compress.calib`: token subsampling, chunked statistics, chunk sizing."""
import pytest
import torch

from llmopt.passes.compress import calib


def test_subsample_keeps_evenly_spaced_rows_in_fp32():
    x = torch.arange(1000, dtype=torch.float16).unsqueeze(1).expand(1000, 3)  # row i holds i
    rows = calib.calibration_rows(x, 3, 10, "cpu", "test")
    assert rows.shape == (10, 3) and rows.dtype == torch.float32
    assert rows[:, 0].tolist() == torch.linspace(0, 999, 10).round().tolist()
    assert calib.calibration_rows(x[:5], 3, 10, "cpu", "test").shape == (5, 3)


def test_subsample_flattens_leading_dims():
    assert calib.calibration_rows(torch.randn(4, 6, 8), 8, 100, "cpu", "test").shape == (24, 8)


def test_channel_statistics_match_direct_reductions():
    x = torch.randn(10000, 7, dtype=torch.float16)
    mean = calib.channel_abs_mean(x, 7, "cpu", rows=333)
    torch.testing.assert_close(mean, x.float().abs().mean(0), rtol=1e-5, atol=0)
    assert torch.equal(calib.channel_abs_max(x, 7, "cpu", rows=333), x.float().abs().amax(0))


def test_rows_per_chunk_respects_the_device_budget(monkeypatch):
    monkeypatch.setitem(calib.CHUNK_ELEMENTS, "cpu", 1000)
    assert calib.rows_per_chunk(100, "cpu") == 10
    assert calib.rows_per_chunk(10**6, "cpu") == 1  # never zero rows
    assert calib.rows_per_chunk(100, "cuda") == (1 << 26) // 100


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(4, 5), "5 channels, the weights expect K=8"),
        (torch.randn(0, 8), "no calibration tokens"),
        (torch.full((2, 8), float("inf")), "NaN or Inf"),
    ],
)
def test_bad_calibration_inputs_raise(x, message):
    with pytest.raises(ValueError, match=message):
        calib.calibration_rows(x, 8, 100, "cpu", "who")
