"""The warp-specialized Hopper attention kernel (`codegen/kernels/flash_attention_hopper.py`).

On CPU its source runs under the Triton interpreter (16-row tiles; the warp specialization is a
compile-time split that the interpreter ignores), so the tiling, masks and TMA views are checked there
in fp16; the `gpu` tests check the compiled kernel in bf16/fp16 on the H200, where `flash_attention`
takes it by default.
"""
import pytest
import torch

import llmopt.ops  # noqa: F401  (registers torch.ops.llmopt.attention)
from llmopt.codegen.kernels import flash_attention_hopper
from llmopt.codegen.kernels.flash_attention import flash_attention
from tests.codegen.test_attention_kernels import DEVICE, assert_close, needs_cuda


def run_ws(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype, token_major=False):
    if token_major:  # as the models make them: [B, T, H, D] memory seen as [B, H, T, D]
        q = torch.randn(batch, seq_q, q_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(batch, seq_k, kv_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(batch, q_heads, seq_q, head_dim, device=DEVICE, dtype=dtype)  # [B, Hq, T, D]
        k, v = (torch.randn(batch, kv_heads, seq_k, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))  # [B, Hkv, S, D]
    scale = head_dim**-0.5
    out = torch.empty(batch, seq_q, q_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)  # token-major
    flash_attention_hopper.flash_attention_ws(q, k, v, out, scale, causal)
    assert_close(out, torch.ops.llmopt.attention(q, k, v, None, scale, causal), dtype)


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, causal, token_major",
    [
        (1, 2, 1, 40, 40, True, False),  # partial last tile
        (2, 4, 2, 33, 57, True, True),  # S > T (the causal diagonal shifted), GQA, token-major
        (1, 2, 2, 48, 48, False, False),  # whole tiles: no key mask
        (1, 4, 1, 20, 37, False, True),  # partial key tile masked without causality
    ],
)
def test_warp_specialized_kernel_matches_the_reference(poison, batch, q_heads, kv_heads, seq_q, seq_k, causal, token_major):
    run_ws(batch, q_heads, kv_heads, seq_q, seq_k, 64, causal, torch.float16, token_major)


def test_the_first_use_check_accepts_a_matching_kernel_and_rejects_a_wrong_or_failing_one(monkeypatch):
    assert flash_attention_hopper._matches_portable_kernel(torch.device(DEVICE), torch.float16, 64, True)
    wrong = lambda q, k, v, out, scale, causal: out.fill_(1.0)  # noqa: E731
    monkeypatch.setattr(flash_attention_hopper, "flash_attention_ws", wrong)
    with pytest.warns(RuntimeWarning, match="relative error .* using the portable kernel"):
        assert not flash_attention_hopper._matches_portable_kernel(torch.device(DEVICE), torch.float16, 64, True)

    def broken(*args):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(flash_attention_hopper, "flash_attention_ws", broken)  # as a Triton that cannot compile it
    with pytest.warns(RuntimeWarning, match="failed .*PassManager::run failed; using the portable kernel"):
        assert not flash_attention_hopper._matches_portable_kernel(torch.device(DEVICE), torch.float16, 64, False)


def test_flash_attention_kernel_choice_is_checked():
    q = torch.randn(1, 2, 8, 64, device=DEVICE, dtype=torch.float32)
    with pytest.raises(ValueError, match="kernel must be"):
        flash_attention(q, q, q, 1.0, True, kernel="fast")
    if not torch.cuda.is_available():  # fp32 never takes it; neither does a machine without sm_90
        with pytest.raises(ValueError, match="needs an sm_90 GPU"):
            flash_attention(q, q, q, 1.0, True, kernel="warp_specialized")
    assert not flash_attention_hopper.usable(q, q, q, True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 128), (torch.float16, 128)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch, seq_q, seq_k", [(2, 1000, 1000), (1, 100, 2100), (2, 1, 513), (1, 4096, 4096)])
def test_warp_specialized_kernel_gpu(poison, batch, seq_q, seq_k, causal, head_dim, dtype):
    assert torch.cuda.get_device_capability() == (9, 0), "the warp-specialized kernel is for sm_90 (the H200)"
    q = torch.randn(batch, 8, seq_q, head_dim, device="cuda", dtype=dtype)
    assert flash_attention_hopper.usable(q, q[:, :2], q[:, :2], causal), "flash_attention would not take this path here"
    for token_major in (False, True):
        run_ws(batch, 8, 2, seq_q, seq_k, head_dim, causal, dtype, token_major)


@pytest.mark.gpu
@needs_cuda
def test_flash_attention_takes_the_warp_specialized_kernel_on_hopper(monkeypatch):
    calls = []
    real = flash_attention_hopper.flash_attention_ws
    monkeypatch.setattr(flash_attention_hopper, "flash_attention_ws", lambda *a: calls.append(a) or real(*a))
    q = torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16)
    flash_attention(q, q, q, 0.1, True)  # the first use in a process also runs the kernel once in its check
    assert any(args[0] is q for args in calls), "flash_attention did not take the warp-specialized kernel for bf16, head dim 128"
    calls.clear()
    flash_attention(q[..., :64], q[..., :64], q[..., :64], 0.1, True)  # head dim 64: the portable kernel is faster
    assert not calls


def test_tma_readiness_of_operands():
    base = torch.randn(1, 2, 8, 72, dtype=torch.float16)
    assert flash_attention_hopper._tma_ready(base[..., :64])  # row stride 144 bytes, aligned base
    assert not flash_attention_hopper._tma_ready(base[..., 1:65])  # base 2 bytes off a 16-byte boundary
    assert not flash_attention_hopper._tma_ready(torch.randn(1, 2, 8, 36, dtype=torch.float16)[..., :32])  # 72-byte rows
    assert not flash_attention_hopper._tma_ready(torch.randn(1, 2, 1, 64, dtype=torch.float16).expand(1, 2, 8, 64))  # one row for all tokens
    assert flash_attention_hopper._tma_ready(torch.randn(1, 1, 8, 64, dtype=torch.float16).expand(1, 4, 8, 64))  # broadcast heads
