"""The wgmma W4A16 kernel for small batches (codegen/kernels/w4a16_wgmma.py) and linear_wq's choice of it.

On any machine: the Gluon source compiles for sm_90 with the installed Triton into what the design says (16-byte
weight loads straight into wgmma's register operand, x alone stored to shared memory). On the GPU (`gpu`): every
config against the reference on odd shapes, fp16 and bf16, outputs poisoned; linear_wq takes it exactly where it
should; a kernel that fails its check warns and leaves linear_wq's other paths in charge.
"""

import pytest
import torch

import llmopt.ops  # noqa: F401  (registers torch.ops.llmopt)
from tests.codegen.sm90_compile import compile_job
from tests.codegen.test_w4a16_direct import (_inputs, _reference, assert_failing_kernel_warns_once,
                                             assert_linear_wq_routes)

needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                  reason="the wgmma kernel runs on sm_90 GPUs")

_COMPILE_FOR_SM90 = """
import json
import re
from collections import Counter
from llmopt.codegen.kernels import w4a16_wgmma
from tests.codegen.sm90_compile import compile_gluon_for_sm90

compiled = compile_gluon_for_sm90(
    w4a16_wgmma._w4_wgmma_kernel,
    {"x_ptr": "*bf16", "qw_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
     "ws_ptr": "*fp32", "count_ptr": "*i32"},
    {"GROUP_SIZE": 128, "BM": 64, "SPLIT_K": 2, "HAS_BIAS": True},
    ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "stride_xm", "stride_qn"), num_warps=4)
ptx = compiled.asm["ptx"]
print(json.dumps({"wgmma": ptx.count("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"),
                  "loads": Counter(re.findall(r"ld[.]global[.a-z0-9]*", ptx)),
                  "stores": Counter(re.findall(r"st[.]shared[.a-z0-9]*", ptx)), "cp_async": ptx.count("cp.async"),
                  "barriers": ptx.count("bar.sync"), "shared": compiled.metadata.shared}))
"""

BACKGROUND = {
    "test_wgmma_kernel_compiles_for_hopper_with_weights_in_registers":
        compile_job(_COMPILE_FOR_SM90),
}


def test_wgmma_kernel_compiles_for_hopper_with_weights_in_registers():
    """Compiled for sm_90 (in a child process: this suite runs Triton's interpreter, which does not compile). The
    `assert_trivial` conversion of the dequantized weights into wgmma's A layout is part of the source, so compiling
    at all means the nibble relabelling costs no data movement."""
    import json

    done = BACKGROUND["test_wgmma_kernel_compiles_for_hopper_with_weights_in_registers"].result()
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["wgmma"] == 16  # the loop's two blocks of 128 k, 8 k-steps each, x rows as wgmma's n = 64
    loads = result["loads"]
    # 16-byte loads: two of weights a block (rows g and g + 8) for four block loads (two before the loop, two in
    # it), eight of x a block (64 rows x 256 bytes over 128 threads) for three (one before, two in)
    assert loads["ld.global.v4.b32"] == 4 * 2 + 3 * 8, loads
    assert loads["ld.global.b16"] == 4 * 4 + 2, loads  # zero point and scale of two rows a block; the bias
    # shared memory holds x only: 32 four-byte stores a block (64 values a thread), two blocks, and one word for
    # the split-K counter's answer; no cp.async staging; one barrier a block and two around the split-K counter
    # (Triton 3.6: 4; 3.9 adds 3 of its own), not one a k-step
    stores = result["stores"]
    assert stores["st.shared.b32"] >= 2 * 32 and sum(stores.values()) == 2 * 32 + 1, stores
    assert result["cp_async"] == 0 and 4 <= result["barriers"] <= 7
    assert result["shared"] == 2 * 64 * 128 * 2  # two x buffers [64, 128] bf16


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m,n,k,g,dtype,with_bias", [
    (17, 4096 + 96, 4096, 128, torch.bfloat16, True), (20, 100, 384, 128, torch.float16, False),
    (64, 4100, 11008, 128, torch.bfloat16, False), (37, 77, 1024, 256, torch.bfloat16, True),
    (128, 33, 128, 128, torch.float16, True), (100, 11008, 4096, 512, torch.float16, False),
    (9, 200, 1280, 256, torch.bfloat16, True),  # below MIN_M: linear_wq does not send it, the kernel computes it
])
def test_wgmma_kernel_matches_reference_in_every_config(poison, m, n, k, g, dtype, with_bias):
    from llmopt.codegen.kernels.w4a16_wgmma import CONFIGS, linear_w4_wgmma

    x, qweight, scales, zeros, bias = _inputs(m, n, k, g, dtype, with_bias, seed=m + n)
    ref = _reference(x, qweight, scales, zeros, bias, g)
    for split_k in CONFIGS + [1]:
        y = linear_w4_wgmma(x, qweight, scales, zeros, bias, g, split_k)
        assert y.shape == (m, n) and y.dtype == dtype
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < (4e-3 if dtype == torch.bfloat16 else 1e-3), (split_k, err)  # the output's rounding
        assert torch.equal(y, linear_w4_wgmma(x, qweight, scales, zeros, bias, g, split_k))  # deterministic


@pytest.mark.gpu
@needs_hopper
def test_linear_wq_takes_the_wgmma_kernel_for_17_to_128_rows_only(monkeypatch):
    from llmopt.codegen.kernels import w4a16_wgmma

    assert_linear_wq_routes(monkeypatch, w4a16_wgmma, "linear_w4_wgmma",
                            [(17, 128, 4, True), (64, 256, 3, True), (128, 128, 4, True), (16, 128, 4, False),
                             (129, 128, 4, False), (32, 64, 4, False), (32, 128, 8, False)])


@pytest.mark.gpu
@needs_hopper
def test_a_failing_wgmma_kernel_warns_and_linear_wq_still_answers(monkeypatch):
    from llmopt.codegen.kernels import w4a16_wgmma

    assert_failing_kernel_warns_once(monkeypatch, w4a16_wgmma, "linear_w4_wgmma", 48,
                                     "wgmma W4A16 kernel failed .*PassManager::run failed; using linear_wq")
