"""The Hopper attention kernels: Triton's warp-specialized one (`codegen/kernels/flash_attention_hopper.py`)
and the Gluon one (`codegen/kernels/flash_attention_gluon.py`), and how `flash_attention` picks them.

On CPU the Triton kernel's source runs under the Triton interpreter (16-row tiles; the warp
specialization is a compile-time split that the interpreter ignores), so its tiling, masks and TMA views
are checked there in fp16. The interpreter does not run Gluon: on CPU the Gluon kernel is compiled for
sm_90 with the installed Triton and its partitions are checked in the compiler's output. The `gpu` tests
run both in bf16/fp16 on the H200, where `flash_attention` takes the Gluon kernel by default.
"""
import sys

import pytest
import torch

import llmopt.ops  # noqa: F401  (registers torch.ops.llmopt.attention)
from llmopt.codegen.kernels import flash_attention_hopper
from llmopt.codegen.kernels.flash_attention import flash_attention
from tests.codegen.sm90_compile import compile_job
from tests.codegen.test_attention_kernels import DEVICE, assert_close, needs_cuda


def run_ws(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype, token_major=False, name="warp_specialized"):
    if token_major:  # as the models make them: [B, T, H, D] memory seen as [B, H, T, D]
        q = torch.randn(batch, seq_q, q_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(batch, seq_k, kv_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(batch, q_heads, seq_q, head_dim, device=DEVICE, dtype=dtype)  # [B, Hq, T, D]
        k, v = (torch.randn(batch, kv_heads, seq_k, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))  # [B, Hkv, S, D]
    scale = head_dim**-0.5
    out = torch.empty(batch, seq_q, q_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)  # token-major
    flash_attention_hopper.run(name, q, k, v, out, scale, causal)
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
    check = flash_attention_hopper._matches_portable_kernel
    assert check("warp_specialized", torch.device(DEVICE), torch.float16, 64, True)
    # the rejections below do not depend on how the check's reference output is computed (an all-ones output
    # is far from any correct attention; a kernel that raises is never compared): the interpreted portable
    # kernel, seconds a call on CPU, is swapped for the reference op it is tested against
    if DEVICE == "cpu":
        portable = sys.modules[flash_attention.__module__]  # the module (the package exports its function by the same name)
        monkeypatch.setattr(portable, "flash_attention", lambda q, k, v, scale, causal, mask=None, kernel="auto":
                            torch.ops.llmopt.attention(q, k, v, mask, scale, causal))
    wrong = lambda q, k, v, out, scale, causal: out.fill_(1.0)  # noqa: E731
    monkeypatch.setattr(flash_attention_hopper, "_run_gluon", wrong)
    with pytest.warns(RuntimeWarning, match="Gluon attention kernel gives a relative error .* not using it"):
        assert not check("gluon", torch.device(DEVICE), torch.float16, 64, True)

    def broken(*args):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(flash_attention_hopper, "flash_attention_ws", broken)  # as a Triton that cannot compile it
    with pytest.warns(RuntimeWarning, match="warp-specialized attention kernel failed .*PassManager::run failed; not using it"):
        assert not check("warp_specialized", torch.device(DEVICE), torch.float16, 64, False)


def test_flash_attention_kernel_choice_is_checked():
    q = torch.randn(1, 2, 8, 64, device=DEVICE, dtype=torch.float32)
    with pytest.raises(ValueError, match="kernel must be"):
        flash_attention(q, q, q, 1.0, True, kernel="fast")
    for kernel in ("gluon", "warp_specialized"):  # fp32 never takes them; neither does a machine without sm_90
        with pytest.raises(ValueError, match=f"the {kernel} kernel needs an sm_90 GPU"):
            flash_attention(q, q, q, 1.0, True, kernel=kernel)
    assert flash_attention_hopper.choose(q, q, q, True) is None


_COMPILE_GLUON_FOR_SM90 = """
import json
import re
from llmopt.codegen.kernels import flash_attention_gluon as gluon_kernel
from tests.codegen.sm90_compile import compile_gluon_for_sm90

layout = repr(gluon_kernel._BOX_LAYOUT)
compiled = compile_gluon_for_sm90(
    gluon_kernel._flash_attention_gluon_kernel,
    {"desc_q": f"tensordesc<bf16[1, 1, 64, 128],{layout}>", "desc_k": f"tensordesc<bf16[1, 1, 128, 128],{layout}>",
     "desc_v": f"tensordesc<bf16[1, 1, 128, 128],{layout}>", "out_ptr": "*bf16", "counter_ptr": "*i32",
     "qk_scale": "fp32"},
    {"CAUSAL": True, "STAGES": gluon_kernel.STAGES},
    ("out_ptr", "stride_ob", "stride_oh", "stride_ot"), num_warps=4, maxnreg=168)
ptx = compiled.asm["ptx"]
print(json.dumps({"ttgir": compiled.asm["ttgir"], "shared": compiled.metadata.shared,
                  "wgmma": ptx.count("wgmma.mma_async"), "stores": re.findall("st[.]global[.a-z0-9:]*", ptx)}))
"""

# the compile runs in a child process (started when the tests are collected: tests/background.py)
BACKGROUND = {
    "test_gluon_kernel_compiles_for_hopper_into_a_producer_and_two_consumers":
        compile_job(_COMPILE_GLUON_FOR_SM90),
}


def test_gluon_kernel_compiles_for_hopper_into_a_producer_and_two_consumers():
    """The Gluon source against the installed Triton (its API moves between releases), compiled for sm_90 on
    any machine: one producer warp and two 4-warp consumer groups issuing asynchronous wgmma, storing the output
    as 16-byte vectors. In a child process, since this suite runs Triton's interpreter, which does not compile."""
    import json

    done = BACKGROUND["test_gluon_kernel_compiles_for_hopper_into_a_producer_and_two_consumers"].result()
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ttgir = result["ttgir"]
    assert "ttg.warp_specialize" in ttgir and "requestedRegisters = array<i32: 240, 24>" in ttgir
    assert "num_warps(4)" in ttgir and "num_warps(1)" in ttgir  # the second consumer group and the producer
    assert result["shared"] <= 227 * 1024  # the H200's shared memory per block
    assert result["wgmma"] >= 16  # QKᵀ and PV, 64-row tiles, both consumers
    # the output leaves as 16-byte vectors (8 consecutive columns a thread, `_columns_per_thread`): 8 a thread
    # for a consumer's 64 x 128 tile, both consumers
    assert result["stores"] == ["st.global.v4.b32"] * 16, result["stores"]


def test_gluon_path_takes_broadcast_kv_heads_only_when_both_are():
    q = torch.randn(1, 4, 8, 128, dtype=torch.float16)
    kv = torch.randn(1, 1, 8, 128, dtype=torch.float16).expand(1, 4, 8, 128)  # stride 0 over heads
    if flash_attention_hopper.flash_attention_gluon is None:
        pytest.fail("this Triton has no Gluon Hopper modules (Triton >= 3.6 does)")
    assert flash_attention_hopper._gluon_ready(q, kv, kv)
    assert not flash_attention_hopper._gluon_ready(q, kv, kv.contiguous())  # one broadcast, one not
    assert not flash_attention_hopper._gluon_ready(q.expand(2, 4, 8, 128), kv, kv)  # batch stride 0, stepped


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 128), (torch.float16, 128)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch, seq_q, seq_k", [(2, 1000, 1000), (1, 100, 2100), (2, 1, 513), (1, 4096, 4096)])
def test_warp_specialized_kernel_gpu(poison, batch, seq_q, seq_k, causal, head_dim, dtype):
    assert torch.cuda.get_device_capability() == (9, 0), "the warp-specialized kernel is for sm_90 (the H200)"
    q = torch.randn(batch, 8, seq_q, head_dim, device="cuda", dtype=dtype)
    assert flash_attention_hopper.choose(q, q[:, :2], q[:, :2], causal, "warp_specialized") == "warp_specialized"
    for token_major in (False, True):
        run_ws(batch, 8, 2, seq_q, seq_k, head_dim, causal, dtype, token_major)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch, q_heads, kv_heads, seq_q, seq_k", [
    (2, 8, 2, 1000, 1000), (1, 8, 2, 100, 2100), (2, 8, 2, 1, 513), (1, 8, 2, 4096, 4096),
    (4, 16, 4, 2000, 2000),  # 1024 tiles on 132 programs: each claims several, of different lengths
])
def test_gluon_kernel_gpu(poison, batch, q_heads, kv_heads, seq_q, seq_k, causal, dtype):
    assert torch.cuda.get_device_capability() == (9, 0), "the Gluon kernel is for sm_90 (the H200)"
    q = torch.randn(batch, q_heads, seq_q, 128, device="cuda", dtype=dtype)
    kv = torch.randn(batch, kv_heads, seq_k, 128, device="cuda", dtype=dtype)
    assert flash_attention_hopper.choose(q, kv, kv, causal) == "gluon", "flash_attention would not take the Gluon kernel here"
    for token_major in (False, True):
        run_ws(batch, q_heads, kv_heads, seq_q, seq_k, 128, causal, dtype, token_major, name="gluon")


@pytest.mark.gpu
@needs_cuda
def test_gluon_kernel_reads_kv_broadcast_over_heads_and_runs_again(poison):
    q = torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1, 900, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k_wide, v_wide = k.expand(2, 8, 900, 128), v.expand(2, 8, 900, 128)  # as the lowered models pass GQA K/V
    ref = torch.ops.llmopt.attention(q, k, v, None, 0.1, True)
    for _ in range(3):  # a tile counter not zeroed between launches would make the next one skip tiles
        out = flash_attention(q, k_wide, v_wide, 0.1, True, kernel="gluon")
        assert_close(out, ref, torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_flash_attention_takes_the_gluon_kernel_on_hopper(monkeypatch):
    calls = []
    real = flash_attention_hopper._run_gluon
    monkeypatch.setattr(flash_attention_hopper, "_run_gluon", lambda *a: calls.append(a) or real(*a))
    q = torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16)
    flash_attention(q, q, q, 0.1, True)  # the first use in a process also runs the kernel once in its check
    assert any(args[0] is q for args in calls), "flash_attention did not take the Gluon kernel for bf16, head dim 128"
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
