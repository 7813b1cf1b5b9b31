"""Triton GEMM kernels (`quantize_rows`, `linear_w8a8`, `linear_wq`, `dequantize_wq`) against the reference ops.

Without CUDA the kernels run under the Triton interpreter (tests/codegen/conftest.py) at tiny
shapes in fp16/fp32/int8 (the interpreter computes bf16 wrongly); `-m gpu` adds bf16 and
Llama-sized shapes on the H200. Every buffer the wrappers allocate is poisoned first (NaN for
floats, -128 for int8, which the quantizer never writes), so an unwritten element fails.

Tolerances, from the dtypes:
- the quantizer is bit-identical to the reference (same fp32 amax, correctly rounded divisions,
  ties to even), and int8 x int8 -> int32 is exact, so W8A8 differs from the reference only by
  the fp32 epilogue's rounding (~1e-7) and one or two roundings to the output dtype: fp16 2^-11
  each (2e-3 for two), bf16 2^-8 each (8e-3), fp32 1e-5;
- W4A16 above FUSED_MAX_M rows is the reference's own linear on a weight `dequantize_wq` makes bit
  for bit, so it equals the reference exactly; up to FUSED_MAX_M it either dequantizes exactly as
  the reference does (checked bit for bit with identity inputs) or applies zero point and scale in fp32 after the dot (W is then not rounded to 16 bits,
  and the zero-point term Σx costs up to 10 bits of fp32 precision, still ~1e-5 relative), so the
  differences are far below one rounding of the output to the activation dtype: fp16 1e-3 of the
  largest output, fp32 1e-5 (IEEE dots); bf16 on the GPU 1e-2, as cuBLAS's bf16 reference may
  reduce in bf16.
"""
import pytest
import torch
import triton
from hypothesis import given, settings, strategies as st

import llmopt.ops  # noqa: F401  (registers torch.ops.llmopt)
from llmopt.codegen.kernels.dequantize_wq import dequantize_wq
from llmopt.codegen.kernels.quantize_rows import quantize_rows
from llmopt.codegen.kernels.w4a16_gemm import FUSED_MAX_M, linear_wq
from llmopt.codegen.kernels.w8a8_gemm import linear_w8a8
from llmopt.ops.linear_w8a8 import quantize_per_token, quantize_static
from llmopt.ops.linear_wq import dequantize_groups, pack_int4

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: run `pytest -m gpu` on the H200")
W8A8_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
WQ_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
_torch_empty = torch.empty


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Makes torch.empty return poisoned memory for the duration of a test."""

    def empty(*args, **kwargs):
        t = _torch_empty(*args, **kwargs)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(-128 if t.dtype == torch.int8 else 0x5A)

    monkeypatch.setattr(torch, "empty", empty)


def _assert_close(y, ref, tol):
    """NaN never passes; the error is measured against the largest reference output."""
    assert torch.isfinite(y).all(), "non-finite output (unwritten or poisoned element)"
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


def _w8a8_inputs(m, n, k, dtype, gen):
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)  # x: [M, K]
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE)  # w: [N, K]
    w_scale = (torch.rand(n, generator=gen) * 0.02 + 1e-3).to(DEVICE)  # [N] fp32
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype)  # [N]
    residual = torch.randn(m, n, generator=gen).to(DEVICE, dtype)  # [M, N]
    return x, w, w_scale, bias, residual


def _wq_inputs(m, n, k, group_size, bits, dtype, gen):
    levels = 2**bits
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)  # x: [M, K]
    q = torch.randint(0, levels, (n, k), generator=gen)  # q: [N, K]
    qweight = (pack_int4(q) if bits <= 4 else q.to(torch.uint8)).to(DEVICE)
    scales = (torch.rand(n, k // group_size, generator=gen) * 0.02 + 0.005).to(DEVICE, dtype)  # [N, K // G]
    zeros = torch.randint(0, levels, (n, k // group_size), generator=gen).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype)
    return x, qweight, scales, zeros, bias


# ---- activation quantization ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 37), (3, 64), (17, 130), (100, 24)])
def test_quantize_rows_is_bit_identical(m, k, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=gen) * 3).to(DEVICE, dtype)  # x: [M, K]
    x[0, : min(k, 8)] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 127.0, -127.0, 0.0])[: min(k, 8)].to(dtype)
    q, scale = quantize_rows(x)
    q_ref, scale_ref = quantize_per_token(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)
    static = torch.tensor([0.02], device=DEVICE)
    q, scale = quantize_rows(x, static)
    assert torch.equal(q, quantize_static(x, static)) and scale.shape == (1, 1)


# ---- W8A8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(1, 40, 72), (3, 33, 96), (17, 72, 130), (100, 40, 64)])
@pytest.mark.parametrize("bias,static,residual", [(False, False, False), (True, False, True), (True, True, False)])
def test_linear_w8a8_matches_reference(m, n, k, dtype, bias, static, residual):
    _check_linear_w8a8(m, n, k, dtype, bias, static, residual)


def _check_linear_w8a8(m, n, k, dtype, bias, static, residual):
    """linear_w8a8 (+ residual) against the reference op on seeded inputs of this shape."""
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x, w, w_scale, b, res = _w8a8_inputs(m, n, k, dtype, gen)
    b = b if bias else None
    act_scale = x.float().abs().amax().reshape(1) / 127.0 if static else None
    y = linear_w8a8(x, w, w_scale, b, act_scale, res if residual else None)
    ref = torch.ops.llmopt.linear_w8a8(x, w, w_scale, b, act_scale)
    if residual:
        ref = ref + res
    assert y.shape == (m, n) and y.dtype == dtype
    _assert_close(y, ref, W8A8_TOL[dtype])


@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 9).map(lambda v: 8 * v), k=st.integers(16, 160), seed=st.integers(0, 99))
def test_linear_w8a8_random_shapes(m, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w, w_scale, b, _ = _w8a8_inputs(m, n, k, torch.float16, gen)
    x3 = x.reshape(1, m, k)  # a leading batch dim, as the graph passes it
    y = linear_w8a8(x3, w, w_scale, b, None)
    _assert_close(y, torch.ops.llmopt.linear_w8a8(x3, w, w_scale, b, None), W8A8_TOL[torch.float16])


@pytest.mark.parametrize("m,n,k", [(1, 40, 100), (7, 33, 64), (16, 72, 260)])
def test_w8a8_split_k_is_bit_identical_to_one_split(m, n, k):
    """The decode tiles (16 rows) with K split 1, 2, 3 and 8 ways (8: more splits than K blocks, so some add
    nothing): int32 partial sums add exactly, so every split gives the same bits, and the split counters are back
    at zero for the next call."""
    from llmopt.codegen.kernels.w8a8_gemm import _w8a8_pointer_kernel

    gen = torch.Generator().manual_seed(m * 31 + k)
    x, w, w_scale, bias, res = _w8a8_inputs(m, n, k, torch.float16, gen)
    q, row_scale = quantize_rows(x)  # [M, K] int8, [M, 1] fp32
    tiles = triton.cdiv(n, 32)
    outs = []
    for split in (1, 2, 3, 8):
        c = torch.empty(m, n, dtype=torch.float16, device=DEVICE)  # poisoned
        ws = torch.empty(split, m, n, dtype=torch.int32, device=DEVICE)  # poisoned partial sums
        counters = torch.zeros(tiles, dtype=torch.int32, device=DEVICE)
        _w8a8_pointer_kernel[(tiles, split)](
            q, w, row_scale, w_scale, bias, res, c, ws, counters, m, n, k, 16,
            q.stride(0), w.stride(0), row_scale.stride(0), res.stride(0), c.stride(0),
            HAS_BIAS=True, HAS_RESIDUAL=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=split)
        assert torch.equal(counters, torch.zeros_like(counters)), f"split {split}: counters not reset"
        outs.append(c)
    assert all(torch.equal(c, outs[0]) for c in outs[1:])
    _assert_close(outs[0], torch.ops.llmopt.linear_w8a8(x, w, w_scale, bias, None) + res, W8A8_TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []))
@pytest.mark.parametrize(
    "m,n,k,bias,static,residual",
    [(1, 48, 64, False, False, False), (17, 80, 160, True, False, True), (33, 72, 48, True, True, False), (70, 40, 96, True, False, True)],
)
def test_linear_w8a8_tma_kernel(monkeypatch, m, n, k, dtype, bias, static, residual):
    """The Hopper kernel (TMA descriptors, persistent tile loop, split epilogue; 16-bit outputs) at
    16-byte aligned shapes, forced on at any M; under the interpreter its persistent grid is two
    programs, and k = 48 leaves a K tail that TMA zero-fills."""
    from llmopt.codegen.kernels import w8a8_gemm

    if HAS_CUDA and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("TMA kernel: Hopper only")
    monkeypatch.setattr(w8a8_gemm, "_has_tma", lambda device: True)
    monkeypatch.setattr(w8a8_gemm, "_TMA_MIN_ROWS", 1)
    monkeypatch.setattr(w8a8_gemm, "_w8a8_gemm_pointer_kernel", None)  # taking the other path fails
    _check_linear_w8a8(m, n, k, dtype, bias, static, residual)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="TMA kernel: Hopper only")
def test_tma_kernel_times_its_configs_once_and_a_new_process_reuses_the_choice(monkeypatch, tmp_path):
    """The first prefill-sized call times the TMA kernel's candidates on its own operands and keeps the fastest on
    disk; a new process (its own memory, the same disk) runs it without timing, and the answer is right both times."""
    from llmopt.codegen.kernels import choice_cache, w8a8_gemm

    monkeypatch.setattr(choice_cache, "directory", lambda: tmp_path)
    new_process = lambda: choice_cache.ChoiceCache("w8a8_gemm_tma", [w8a8_gemm.__file__], w8a8_gemm._TMA_SHAPES)
    monkeypatch.setattr(w8a8_gemm, "_tma_choices", new_process())
    timed = []
    time_tma = w8a8_gemm._time_tma
    monkeypatch.setattr(w8a8_gemm, "_time_tma", lambda launch, shape: timed.append(shape) or time_tma(launch, shape))
    monkeypatch.setattr(w8a8_gemm, "_w8a8_gemm_pointer_kernel", None)  # taking the other path fails
    _check_linear_w8a8(1024, 256, 512, torch.bfloat16, True, False, True)
    assert len(timed) > 1 and len(list(tmp_path.glob("w8a8_gemm_tma-*.autotune.json"))) == 1
    monkeypatch.setattr(w8a8_gemm, "_tma_choices", new_process())
    timed.clear()
    _check_linear_w8a8(1024, 256, 512, torch.bfloat16, True, False, True)
    assert timed == []


# ---- W4A16 (and W3, W8) -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 17, 100])
@pytest.mark.parametrize("n,k,group_size,bits", [(40, 96, 32, 4), (33, 128, 64, 3), (72, 256, 128, 4), (24, 128, 32, 8)])
def test_linear_wq_matches_reference(m, n, k, group_size, bits, dtype):
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k + bits)
    x, qweight, scales, zeros, bias = _wq_inputs(m, n, k, group_size, bits, dtype, gen)
    y = linear_wq(x, qweight, scales, zeros, bias, group_size, bits)
    ref = torch.ops.llmopt.linear_wq(x, qweight, scales, zeros, bias, group_size, bits)
    assert y.shape == (m, n) and y.dtype == dtype
    _assert_close(y, ref, WQ_TOL[dtype])


@pytest.mark.parametrize("m", [5, 40])  # the GEMV and the GEMM kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_wq_dequantizes_exactly(m, bits):
    """Rows of the identity pick single weight columns: y must equal the reference's W exactly."""
    n, k, group_size = 24, 64, 32
    gen = torch.Generator().manual_seed(m + bits)
    _, qweight, scales, zeros, _ = _wq_inputs(1, n, k, group_size, bits, torch.float16, gen)
    cols = torch.randperm(k, generator=gen)[:m] % k
    x = torch.eye(k, dtype=torch.float16)[cols].to(DEVICE)  # x: [M, K], one-hot rows
    y = linear_wq(x, qweight, scales, zeros, None, group_size, bits)  # y: [M, N]
    w = dequantize_groups(qweight, scales, zeros, group_size, bits)  # w: [N, K]
    assert torch.equal(y, w.t()[cols.to(DEVICE)])


@pytest.mark.parametrize("out_dtype,scale_dtype", [(torch.float16, torch.float16), (torch.float32, torch.float32),
                                                   (torch.float16, torch.float32)])
@pytest.mark.parametrize("n,k,group_size,bits", [(37, 64, 32, 4), (33, 512, 256, 3), (70, 256, 64, 8), (5, 256, 128, 4)])
def test_dequantize_wq_is_bit_identical(n, k, group_size, bits, out_dtype, scale_dtype):
    gen = torch.Generator().manual_seed(n * 31 + k + bits)
    _, qweight, scales, zeros, _ = _wq_inputs(1, n, k, group_size, bits, scale_dtype, gen)
    w = dequantize_wq(qweight, scales, zeros, group_size, bits, out_dtype)  # w: [N, K]
    assert w.shape == (n, k) and w.dtype == out_dtype
    assert torch.equal(w, dequantize_groups(qweight, scales, zeros, group_size, bits).to(out_dtype))


@pytest.mark.parametrize("m", [FUSED_MAX_M + 1, 150])
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_wq_above_fused_max_m_is_the_reference(m, bits):
    """Prefill-sized M dequantizes and calls the reference's linear: the same numbers, bit for bit."""
    gen = torch.Generator().manual_seed(m + bits)
    x, qweight, scales, zeros, bias = _wq_inputs(m, 40, 128, 32, bits, torch.float16, gen)
    x = x.reshape(1, m, 128)  # leading dims are kept
    y = linear_wq(x, qweight, scales, zeros, bias, 32, bits)
    assert y.shape == (1, m, 40)
    assert torch.equal(y, torch.ops.llmopt.linear_wq(x, qweight, scales, zeros, bias, 32, bits))


@settings(max_examples=6, deadline=None)
@given(
    m=st.sampled_from([1, 2, 5, 16, 19, 33]), n=st.integers(1, 80), groups=st.integers(1, 4),
    group_size=st.sampled_from([32, 64]), seed=st.integers(0, 99),
)
def test_linear_wq_random_shapes(m, n, groups, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    k = groups * group_size
    x, qweight, scales, zeros, bias = _wq_inputs(m, n, k, group_size, 4, torch.float16, gen)
    y = linear_wq(x, qweight, scales, zeros, bias, group_size, 4)
    ref = torch.ops.llmopt.linear_wq(x, qweight, scales, zeros, bias, group_size, 4)
    _assert_close(y, ref, WQ_TOL[torch.float16])


# ---- GPU: bf16 and Llama-sized shapes ----------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,bits", [(333, 4), (2048, 4), (333, 8)])
def test_linear_wq_prefill_gpu_is_the_reference(m, bits):
    """bf16, Llama-sized: the dequantized weight is the reference's bit for bit, and so is the output."""
    gen = torch.Generator().manual_seed(m + bits)
    n, k, group_size = 4096 + 96, 4096, 128
    x, qweight, scales, zeros, bias = _wq_inputs(m, n, k, group_size, bits, torch.bfloat16, gen)
    w = dequantize_wq(qweight, scales, zeros, group_size, bits, torch.bfloat16)
    assert torch.equal(w, dequantize_groups(qweight, scales, zeros, group_size, bits))
    y = linear_wq(x, qweight, scales, zeros, bias, group_size, bits)
    assert torch.equal(y, torch.ops.llmopt.linear_wq(x, qweight, scales, zeros, bias, group_size, bits))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "m,bits,dtype",
    [(1, 4, torch.bfloat16), (7, 4, torch.bfloat16), (16, 4, torch.bfloat16), (64, 4, torch.bfloat16),
     (333, 4, torch.bfloat16), (1, 8, torch.bfloat16), (333, 8, torch.bfloat16), (5, 4, torch.float16)],
)
def test_linear_wq_gpu(m, bits, dtype):
    gen = torch.Generator().manual_seed(m + bits)
    n, k, group_size = 4096 + 96, 4096, 128
    x, qweight, scales, zeros, bias = _wq_inputs(m, n, k, group_size, bits, dtype, gen)
    y = linear_wq(x, qweight, scales, zeros, bias, group_size, bits)
    ref = torch.ops.llmopt.linear_wq(x, qweight, scales, zeros, bias, group_size, bits)
    _assert_close(y, ref, WQ_TOL[dtype])
    eye = torch.eye(k, dtype=dtype, device=DEVICE)[: min(m, 64)]  # exact dequantization, on the GPU
    w = dequantize_groups(qweight, scales, zeros, group_size, bits)
    assert torch.equal(linear_wq(eye, qweight, scales, zeros, None, group_size, bits), w.t()[: eye.shape[0]])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "m,dtype", [(1, torch.bfloat16), (16, torch.bfloat16), (300, torch.bfloat16), (2048, torch.bfloat16), (300, torch.float16)]
)
def test_linear_w8a8_gpu(m, dtype):
    gen = torch.Generator().manual_seed(m)
    n, k = 4096 + 96, 4096 + 64
    x, w, w_scale, b, res = _w8a8_inputs(m, n, k, dtype, gen)
    q, scale = quantize_rows(x)
    q_ref, scale_ref = quantize_per_token(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    y = linear_w8a8(x, w, w_scale, b, None, res)
    _assert_close(y, torch.ops.llmopt.linear_w8a8(x, w, w_scale, b, None) + res, W8A8_TOL[dtype])
    act_scale = x.float().abs().amax().reshape(1) / 127.0
    y = linear_w8a8(x, w, w_scale, None, act_scale)
    _assert_close(y, torch.ops.llmopt.linear_w8a8(x, w, w_scale, None, act_scale), W8A8_TOL[dtype])
