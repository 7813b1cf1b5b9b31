"""The fused residual + RMSNorm/LayerNorm (+ int8 quant) kernel against eager PyTorch and
`llmopt.ops.quantize_per_token`.

On CPU the kernel runs under the Triton interpreter (tests/codegen/conftest.py) in fp16 and fp32;
bf16 and large shapes are `gpu` tests. Outputs start as NaN / -128 (the `poison` fixture).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmopt.codegen.kernels.rmsnorm import residual_layernorm, residual_rmsnorm, residual_rmsnorm_torch
from llmopt.ops import quantize_per_token

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run with -m gpu on the H200")
EPS = 1e-6

# h = x + residual is rounded to the dtype exactly as eager PyTorch rounds it: bit-equal. y follows
# Llama's order, n = round(h * rstd) then y = round(w * n): Triton's rsqrt and PyTorch's differ by a few
# fp32 ulps, which can move n by one ulp of the dtype (relative 2^-10 fp16, 2^-7 bf16), and each of
# the two roundings of y adds half an ulp: |dy| / |y| <= 2 ulps, 2^-9 for fp16 and 2^-6 for bf16
# (seen on the H200: 1 element in 16M off by 2 bf16 ulps); fp32 moves by ~1e-6.
Y_RTOL = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6}


def assert_y_close(y, ref, dtype):
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite output"
    torch.testing.assert_close(y.float(), ref.float(), rtol=Y_RTOL[dtype], atol=Y_RTOL[dtype])


def assert_quant_close(q, scale, y):
    """q and scale against quantize_per_token(y) on the kernel's own y: the same fp32 divisions
    (IEEE, div_rn) and ties-to-even rounding, so equal; one step of slack for a .5 tie."""
    q_ref, scale_ref = quantize_per_token(y)
    assert (q != -128).all(), "unwritten int8 output (-128 is the poison; the kernel clamps to +-127)"
    assert torch.isfinite(scale).all(), "unwritten scale"
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert (q.int() - q_ref.int()).abs().max() <= 1


def check_rmsnorm(rows, k, dtype, quantize, with_residual=True):
    x = torch.randn(rows, k, device=DEVICE, dtype=dtype)  # [M, K]
    residual = torch.randn(rows, k, device=DEVICE, dtype=dtype) if with_residual else None
    weight = torch.randn(k, device=DEVICE, dtype=dtype)  # [K]
    out = residual_rmsnorm(x, residual, weight, EPS, quantize=quantize)
    y_ref, h_ref = residual_rmsnorm_torch(x, residual, weight, EPS)
    assert torch.equal(out.residual, h_ref)
    assert_y_close(out.y, y_ref, dtype)
    if quantize:
        assert out.q.shape == (rows, k) and out.scale.shape == (rows, 1)
        assert_quant_close(out.q, out.scale, out.y)


def check_layernorm(rows, k, dtype, quantize):
    x = torch.randn(rows, k, device=DEVICE, dtype=dtype)  # [M, K]
    residual = torch.randn(rows, k, device=DEVICE, dtype=dtype)
    weight, bias = torch.randn(k, device=DEVICE, dtype=dtype), torch.randn(k, device=DEVICE, dtype=dtype)  # [K]
    out = residual_layernorm(x, residual, weight, bias, 1e-5, quantize=quantize)
    h_ref = x + residual
    y_ref = torch.nn.functional.layer_norm(h_ref.float(), (k,), weight.float(), bias.float(), 1e-5).to(dtype)
    assert torch.equal(out.residual, h_ref)
    assert_y_close(out.y, y_ref, dtype)
    if quantize:
        assert_quant_close(out.q, out.scale, out.y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("rows, k", [(1, 64), (7, 100), (33, 256), (100, 48)])
def test_residual_rmsnorm(poison, rows, k, quantize, dtype):
    check_rmsnorm(rows, k, dtype, quantize)


def test_rmsnorm_without_residual(poison):
    check_rmsnorm(7, 100, torch.float16, quantize=True, with_residual=False)


def test_rmsnorm_leading_dims(poison):
    x = torch.randn(2, 3, 40, device=DEVICE, dtype=torch.float16)  # [B, T, K]
    weight = torch.randn(40, device=DEVICE, dtype=torch.float16)
    out = residual_rmsnorm(x, x, weight, EPS)
    assert out.y.shape == x.shape and out.residual.shape == x.shape
    assert_y_close(out.y, residual_rmsnorm_torch(x, x, weight, EPS)[0], torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("rows, k", [(1, 64), (33, 100)])
def test_residual_layernorm(poison, rows, k, quantize, dtype):
    check_layernorm(rows, k, dtype, quantize)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), k=st.integers(1, 300), quantize=st.booleans())
def test_residual_rmsnorm_random(poison, rows, k, quantize):
    check_rmsnorm(rows, k, torch.float16, quantize)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("rows, k", [(1, 4096), (4099, 4096), (257, 5120), (64, 8192)])
def test_residual_rmsnorm_gpu(poison, rows, k, quantize, dtype):
    check_rmsnorm(rows, k, dtype, quantize)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("quantize", [False, True])
def test_residual_layernorm_gpu(poison, quantize):
    check_layernorm(1000, 4096, torch.bfloat16, quantize)
