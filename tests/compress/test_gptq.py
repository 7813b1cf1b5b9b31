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


def _block_case(bits, group_size, k, n, device):
    from llmopt.passes.compress.gptq import _inverse_hessian_factor
    from llmopt.passes.compress.rtn import group_scale_zero

    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=g)
    x = _correlated_inputs(2 * k, k, seed=n)
    scale, zero = group_scale_zero(w.reshape(n, k // group_size, group_size), bits, False, None, w.dtype)
    u = _inverse_hessian_factor(x.to(device), 0.01)  # [K, K], column-major as cholesky returns it
    return w.to(device), x.to(device), u, scale.squeeze(-1).to(device), zero.squeeze(-1).to(device)


@pytest.mark.parametrize("bits, group_size, k, n", [(4, 32, 160, 24), (3, 64, 256, 40), (8, 32, 96, 8)])
def test_block_kernel_rounds_as_the_torch_loop(bits, group_size, k, n):
    """The Triton kernel for a block's column loop (CUDA's path; the interpreter here) gives the torch loop's
    codes bit for bit where no multiply-add is fused (the interpreter computes in numpy)."""
    from llmopt.passes.compress.gptq import _round_columns

    w, _, u, scale, zero = _block_case(bits, group_size, k, n, "cpu")
    loop = _round_columns(w.clone(), u, scale, zero, bits, group_size, kernel=False)
    kernel = _round_columns(w.clone(), u, scale, zero, bits, group_size, kernel=True)
    assert torch.equal(kernel, loop)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200 machine)")
def test_block_kernel_on_gpu_matches_the_torch_loop():
    """On the GPU a fused multiply-add can move an error in its last bit, so a near-tie code may differ."""
    from llmopt.passes.compress.gptq import _round_columns

    w, x, u, scale, zero = _block_case(4, 128, 1024, 512, "cuda")
    loop = _round_columns(w.clone(), u, scale, zero, 4, 128, kernel=False)
    kernel = _round_columns(w.clone(), u, scale, zero, 4, 128, kernel=True)
    assert float((kernel == loop).float().mean()) > 0.999
    dequant = lambda codes: (codes - zero.repeat_interleave(128, 1)) * scale.repeat_interleave(128, 1)  # noqa: E731
    err_loop, err_kernel = (_output_error(x, w, dequant(c)) for c in (loop, kernel))
    assert err_kernel < 1.01 * err_loop
