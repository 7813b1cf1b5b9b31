"""Triton attention kernels against the reference ops: `flash_attention(_varlen)` against
`torch.ops.llmopt.attention`, `paged_attention` against `torch.ops.llmopt.paged_attention`.

On CPU the kernels run under the Triton interpreter (tests/codegen/conftest.py) at tiny shapes in
fp16 and fp32; bf16 and large shapes are `gpu` tests. Outputs start as NaN (the `poison` fixture).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmopt.ops  # noqa: F401  (registers torch.ops.llmopt.attention)
import llmopt.ops.paged_attention  # noqa: F401  (registers torch.ops.llmopt.paged_attention)
from llmopt.codegen.kernels.flash_attention import flash_attention, flash_attention_varlen
from llmopt.codegen.kernels.paged_attention import paged_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run with -m gpu on the H200")

# ‖out - ref‖ / ‖ref‖ bounds. The reference keeps probabilities in fp32; the kernels round them to the
# operand dtype before P @ V and round the output: fp16 (11-bit mantissa, 2^-11 = 4.9e-4 per rounding)
# lands near 5e-4, bf16 (8 bits, 3.9e-3) near 4e-3; fp32 operands use IEEE dots and land near 1e-6.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def assert_close(out, ref, dtype):
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output"
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()
    assert err < REL_TOL[dtype], f"relative error {err:.2e} over {REL_TOL[dtype]:.0e} for {dtype}"


def check_padded(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype):
    q = torch.randn(batch, q_heads, seq_q, head_dim, device=DEVICE, dtype=dtype)  # [B, Hq, T, D]
    k = torch.randn(batch, kv_heads, seq_k, head_dim, device=DEVICE, dtype=dtype)  # [B, Hkv, S, D]
    v = torch.randn(batch, kv_heads, seq_k, head_dim, device=DEVICE, dtype=dtype)
    scale = head_dim**-0.5
    out = flash_attention(q, k, v, scale, causal)
    assert_close(out, torch.ops.llmopt.attention(q, k, v, None, scale, causal), dtype)


def check_varlen(lens_q, lens_k, q_heads, kv_heads, head_dim, causal, dtype):
    q = torch.randn(sum(lens_q), q_heads, head_dim, device=DEVICE, dtype=dtype)  # [total_T, Hq, D]
    k = torch.randn(sum(lens_k), kv_heads, head_dim, device=DEVICE, dtype=dtype)  # [total_S, Hkv, D]
    v = torch.randn(sum(lens_k), kv_heads, head_dim, device=DEVICE, dtype=dtype)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32)  # [B + 1]
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32)
    scale = head_dim**-0.5
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), scale, causal)
    refs = []
    for b in range(len(lens_q)):  # each sequence alone, as a batch of one: [1, H, T_b, D]
        qb, kb, vb = (t[c[b]:c[b + 1]].transpose(0, 1)[None] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        refs.append(torch.ops.llmopt.attention(qb, kb, vb, None, scale, causal)[0].transpose(0, 1))
    assert_close(out, torch.cat(refs), dtype)


def make_paged(lens, q_heads, kv_heads, head_dim, block_size, dtype, spare_blocks=3):
    """A shuffled paged cache holding len(lens) sequences; the last block of each is partly filled."""
    blocks_per_seq = max(-(-n // block_size) for n in lens) + 1  # one unused entry past the longest
    num_blocks = len(lens) * blocks_per_seq + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    perm = torch.randperm(num_blocks, device=DEVICE)[: len(lens) * blocks_per_seq]
    block_tables = perm.reshape(len(lens), blocks_per_seq).to(torch.int32)  # [B, max_blocks]
    seq_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)  # [B]
    q = torch.randn(len(lens), q_heads, head_dim, device=DEVICE, dtype=dtype)  # [B, Hq, D]
    return q, k_cache, v_cache, block_tables, seq_lens


def check_paged(lens, q_heads, kv_heads, head_dim, block_size, dtype, split_len=None):
    q, k_cache, v_cache, block_tables, seq_lens = make_paged(lens, q_heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    out = paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, split_len=split_len)
    assert_close(out, torch.ops.llmopt.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal",
    [
        (1, 2, 2, 1, 1, 64, True),  # one token
        (2, 4, 2, 7, 7, 64, True),  # GQA 2
        (1, 4, 1, 33, 33, 128, True),  # GQA 4, head dim 128
        (1, 2, 1, 1, 100, 64, True),  # decode-like: one query, the last, sees every key
        (1, 2, 2, 7, 33, 64, True),  # T < S: aligned to the end
        (1, 2, 2, 33, 7, 64, True),  # T > S: the first 26 queries see no key and give zeros
        (1, 4, 2, 100, 100, 64, False),
        (1, 4, 2, 40, 40, 96, True),  # head dim 96 (Phi-3): tiles padded to 128, the padding never stored
        (2, 2, 1, 9, 20, 80, True),  # head dim 80 (Phi-2), T < S
        (1, 2, 2, 17, 17, 24, False),  # head dim 24: padded to 32
    ],
)
def test_flash_attention_padded(poison, batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype):
    check_padded(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 96])
def test_flash_attention_varlen_ragged(poison, causal, head_dim):
    check_varlen([1, 7, 33, 20], [1, 7, 40, 100], 4, 2, head_dim, causal, torch.float16)


@pytest.mark.parametrize("head_dim", [4, 12, 264])
def test_flash_attention_refuses_other_head_dims(head_dim):
    q = torch.randn(1, 2, 3, head_dim, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="a multiple of 8 up to 256"):
        flash_attention(q, q, q, 1.0, True)


def test_flash_attention_refuses_query_heads_that_are_not_a_multiple_of_kv_heads():
    q = torch.randn(1, 3, 8, 128, device=DEVICE, dtype=torch.bfloat16)  # [B, Hq, T, D]: checked before any kernel is chosen
    kv = torch.randn(1, 2, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="3 query heads is not a multiple of 2 KV heads"):
        flash_attention(q, kv, kv, 1.0, True)
    cu = torch.tensor([0, 8], device=DEVICE, dtype=torch.int32)
    with pytest.raises(ValueError, match="3 query heads is not a multiple of 2 KV heads"):
        flash_attention_varlen(q[0].transpose(0, 1), kv[0].transpose(0, 1), kv[0].transpose(0, 1), cu, cu, 8, 1.0, True)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 30)), min_size=1, max_size=3),
    group=st.sampled_from([1, 2, 4]),
    causal=st.booleans(),
)
def test_flash_attention_varlen_random(poison, lens, group, causal):
    check_varlen([t for t, _ in lens], [t + extra for t, extra in lens], 2 * group, 2, 64, causal, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "lens, q_heads, kv_heads, head_dim, split_len",
    [
        ([1, 17, 40], 4, 4, 64, None),  # GQA 1, one split
        ([33, 100], 4, 2, 64, 32),  # GQA 2, splits of 32 tokens, some past the end of the short sequence
        ([7, 64, 1], 8, 2, 128, 16),  # GQA 4, head dim 128
        ([0, 20], 4, 1, 64, 16),  # an empty sequence gives zeros
        ([5, 40], 4, 2, 96, 16),  # head dim 96: padded tiles, split and merged
        ([30], 2, 1, 80, None),  # head dim 80, one split
    ],
)
def test_paged_attention(poison, lens, q_heads, kv_heads, head_dim, split_len, dtype):
    check_paged(lens, q_heads, kv_heads, head_dim, 16, dtype, split_len)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    group=st.sampled_from([1, 2, 4]),
    block_size=st.sampled_from([8, 16]),
    split_len=st.sampled_from([None, 16, 48]),
)
def test_paged_attention_random(poison, lens, group, block_size, split_len):
    check_paged(lens, 2 * group, 2, 64, block_size, torch.float16, split_len)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "dtype, head_dim, causal",
    [(torch.bfloat16, 128, True), (torch.bfloat16, 128, False), (torch.bfloat16, 64, True), (torch.float16, 128, True),
     (torch.bfloat16, 96, True), (torch.bfloat16, 256, True), (torch.float16, 256, False), (torch.bfloat16, 80, False)],
)
@pytest.mark.parametrize("batch, seq_q, seq_k", [(2, 1000, 1000), (1, 100, 2100), (2, 1, 513)])
def test_flash_attention_gpu(poison, batch, seq_q, seq_k, causal, head_dim, dtype):
    check_padded(batch, 8, 2, seq_q, seq_k, head_dim, causal, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_flash_attention_varlen_gpu(poison, dtype):
    check_varlen([1, 7, 100, 1000, 2047], [1, 300, 100, 1500, 2047], 32, 8, 128, True, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 128), (torch.float16, 64), (torch.bfloat16, 96), (torch.bfloat16, 256)])
def test_paged_attention_gpu(poison, head_dim, dtype):
    check_paged([1, 15, 16, 17, 1000, 5000, 33, 4097], 32, 8, head_dim, 16, dtype)


def check_masked(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, mask, dtype, device=DEVICE):
    q = torch.randn(batch, q_heads, seq_q, head_dim, device=device, dtype=dtype)  # [B, Hq, T, D]
    k = torch.randn(batch, kv_heads, seq_k, head_dim, device=device, dtype=dtype)  # [B, Hkv, S, D]
    v = torch.randn(batch, kv_heads, seq_k, head_dim, device=device, dtype=dtype)
    scale = head_dim**-0.5
    out = flash_attention(q, k, v, scale, True, mask)  # causal is ignored with a mask, as in the reference
    assert_close(out, torch.ops.llmopt.attention(q, k, v, mask, scale, True), dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_flash_attention_with_a_packed_sequence_mask(poison, dtype):
    """Two sequences packed in one row (block-diagonal causal), broadcast over batch and heads."""
    seq = 40
    doc = torch.tensor([0] * 17 + [1] * 23)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = (causal & (doc[:, None] == doc[None, :]))[None, None].to(DEVICE)  # [1, 1, T, S]
    check_masked(2, 4, 2, seq, seq, 64, mask, dtype)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq_q=st.integers(1, 40), extra=st.integers(0, 20), per_head=st.booleans(), head_dim=st.sampled_from([32, 96]),
       seed=st.integers(0, 2**16))
def test_flash_attention_with_random_masks(poison, seq_q, extra, per_head, head_dim, seed):
    """Random boolean masks, per batch (and per head), with rows that may attend to nothing (zeros)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 4 if per_head else 1, seq_q, seq_q + extra, generator=g) < 0.6
    mask[:, :, 0] = False  # the first query sees no key
    out = check_masked(2, 4, 2, seq_q, seq_q + extra, head_dim, mask.to(DEVICE), torch.float16)
    assert bool((out[:, :, 0] == 0).all())


def test_flash_attention_refuses_a_float_mask():
    q = torch.randn(1, 2, 3, 16, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="mask must be bool"):
        flash_attention(q, q, q, 1.0, True, torch.zeros(1, 1, 3, 3, device=DEVICE))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [128, 96])
def test_flash_attention_masked_gpu(poison, head_dim):
    doc = torch.arange(1500) // 300  # five packed sequences of 300 tokens
    mask = (torch.ones(1500, 1500, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :]))[None, None].cuda()
    check_masked(2, 8, 2, 1500, 1500, head_dim, mask, torch.bfloat16)
