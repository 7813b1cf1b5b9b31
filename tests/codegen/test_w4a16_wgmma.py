"""The wgmma W4A16 kernel for small batches (codegen/kernels/w4a16_wgmma.py) and linear_wq's choice of it.

On any machine: the inline assembly that turns 16 loaded bytes into wgmma's A fragment computes, bit for bit, what
the kernel's labels say (run on a lane quad by `ptx_quad.py`); the Gluon source compiles for sm_90 with the
installed Triton into what the design says (16-byte weight loads straight into wgmma's register operand, x by TMA,
no thread storing to shared memory). On the GPU (`gpu`): every config against the reference on odd shapes, fp16
and bf16, outputs poisoned; linear_wq takes it exactly where it should; a kernel that fails its check warns and
leaves linear_wq's other paths in charge.
"""
import random

import pytest
import torch

import llmopt.ops  # noqa: F401  (registers torch.ops.llmopt)
from tests.codegen.ptx_quad import as_16_bit, run_on_quad, run_on_words
from tests.codegen.sm90_compile import compile_job
from tests.codegen.test_w4a16_direct import (_inputs, _reference, assert_failing_kernel_warns_once,
                                             assert_linear_wq_routes)

needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                  reason="the wgmma kernel runs on sm_90 GPUs")


def test_quad_transpose_leaves_each_lane_byte_c_of_every_word():
    """Lane c of a quad loads bytes 16c .. 16c + 15 of a weight row (words j = 0..3, bytes B[c][j][b]); after the
    two shuffle rounds its word j holds B[x][j][c] in byte x: the k pairs at 2c (mod 8) that wgmma's A fragment
    gives quad position c."""
    from llmopt.codegen.kernels.w4a16_wgmma import _TRANSPOSE_ASM

    rng = random.Random(0)
    for _ in range(20):
        loaded = [[[rng.randrange(256) for b in range(4)] for j in range(4)] for c in range(4)]  # B[c][j][b]
        words = [[int.from_bytes(bytes(loaded[c][j]), "little") for j in range(4)] for c in range(4)]
        out = run_on_quad(_TRANSPOSE_ASM.value, words)
        for c, j in ((c, j) for c in range(4) for j in range(4)):
            assert list(out[c][j].to_bytes(4, "little")) == [loaded[x][j][c] for x in range(4)], (c, j)


@pytest.mark.parametrize("dtype,magic", [(torch.bfloat16, 128), (torch.float16, 1024)])
def test_pair_asm_makes_each_byte_the_float_pair_magic_plus_its_nibbles(dtype, magic):
    """Register x of a transposed word: (MAGIC + low nibble, MAGIC + high nibble) of its byte x, as 16-bit floats:
    the weights at k and k + 1 before the zero point and scale."""
    from llmopt.codegen.kernels import w4a16_wgmma

    asm = (w4a16_wgmma._PAIR_ASM_BF16 if dtype == torch.bfloat16 else w4a16_wgmma._PAIR_ASM_FP16).value
    for word, registers in run_on_words(asm, seed=1):
        pairs = [half for register in registers for half in as_16_bit(register, dtype)]  # byte x's (lo, hi)
        expected = [magic + (word >> (8 * x + 4 * e) & 0xF) for x in range(4) for e in range(2)]
        assert pairs == expected, hex(word)


_COMPILE_FOR_SM90 = """
import json
import re
from collections import Counter
from llmopt.codegen.kernels import w4a16_wgmma
from tests.codegen.sm90_compile import compile_gluon_for_sm90

compiled = compile_gluon_for_sm90(
    w4a16_wgmma._w4_wgmma_kernel,
    {"x_desc": f"tensordesc<bf16[64, 128],{w4a16_wgmma._X_SMEM_LAYOUT!r}>", "qw_ptr": "*u8", "s_ptr": "*bf16",
     "z_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "count_ptr": "*i32"},
    {"GROUP_SIZE": 128, "SPLIT_K": 2, "STAGES": 4, "ASYNC": False, "HAS_BIAS": True},
    ("qw_ptr", "s_ptr", "z_ptr", "stride_qn"), num_warps=4)
ptx = compiled.asm["ptx"]
print(json.dumps({"wgmma": ptx.count("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"),
                  "loads": Counter(re.findall(r"ld[.]global[.a-z0-9]*", ptx)),
                  "stores": Counter(re.findall(r"st[.]shared[.a-z0-9]*", ptx)), "cp_async": ptx.count("cp.async."),
                  "tma": ptx.count("cp.async.bulk.tensor.2d"), "shuffles": ptx.count("shfl.sync.bfly.b32"),
                  "barriers": ptx.count("bar.sync"), "shared": compiled.metadata.shared}))
"""

BACKGROUND = {
    "test_wgmma_kernel_compiles_for_hopper_with_weights_in_registers":
        compile_job(_COMPILE_FOR_SM90),
}


def test_wgmma_kernel_compiles_for_hopper_with_weights_in_registers():
    """Compiled for sm_90 (in a child process: this suite runs Triton's interpreter, which does not compile). The
    `assert_trivial` conversion of the dequantized weights into wgmma's A layout is part of the source, so compiling
    at all means the quad's byte transpose leaves every thread its fragment in physical order of k."""
    import json

    done = BACKGROUND["test_wgmma_kernel_compiles_for_hopper_with_weights_in_registers"].result()
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["wgmma"] == 16  # the loop's two blocks of 128 k, 8 k-steps each, x rows as wgmma's n = 64
    loads = result["loads"]
    # the weights: two 16-byte loads a block (rows g and g + 8) for four block loads (two before the loop, two in
    # it); their zero point and scale, two rows a block, and the bias; x never passes through registers
    assert loads["ld.global.v4.b32"] == 4 * 2 and loads["ld.global.b16"] == 4 * 4 + 2, loads
    # the last split to arrive reads both partials [64, 64] fp32 at once (unrolled: 32 loads a thread each), not one
    # partial's round trip after the other
    assert loads["ld.global.cg.b32"] == 2 * 32, loads
    # x comes by TMA: STAGES loads before the loop, one a block in it; the weights' transpose is four shuffles a row
    # and block; the threads store nothing to shared memory but the split-K counter's answer
    assert result["tma"] == 4 + 2 and result["shuffles"] == 2 * 2 * 4 and result["cp_async"] == result["tma"]
    assert sum(result["stores"].values()) == 1, result["stores"]
    # Triton 3.6: 14, two a block (the step's own, and one between arming a slot's barrier and its TMA load) and
    # around the mbarriers' init and invalidation (one ring for all blocks had 23, three a block); Triton 3.9: 21
    assert result["barriers"] <= 24, result["barriers"]
    assert result["shared"] == 4 * 64 * 128 * 2 + 4 * 8  # four x slots [64, 128] bf16 and their mbarriers


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
    for config in CONFIGS + [(1, 2, False), (16, 4, True)]:  # (split K, x stages); also no split, and splits without blocks
        y = linear_w4_wgmma(x, qweight, scales, zeros, bias, g, config)
        assert y.shape == (m, n) and y.dtype == dtype
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < (4e-3 if dtype == torch.bfloat16 else 1e-3), (config, err)  # the output's rounding
        assert torch.equal(y, linear_w4_wgmma(x, qweight, scales, zeros, bias, g, config))  # deterministic


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
