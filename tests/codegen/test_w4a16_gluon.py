"""The Gluon W4A16 kernel (`codegen/kernels/w4a16_gluon.py`).

The interpreter does not run Gluon: on CPU the kernel is compiled for sm_90 with the installed Triton (in a
child process, since this suite runs the interpreter), and its structure is checked in the compiler's output.
The `gpu` tests run it on the H200/H100 against the reference op, outputs poisoned first, odd sizes included.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HAS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)

_COMPILE_FOR_SM90 = """
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import compile as triton_compile
from triton.experimental.gluon._runtime import GluonASTSource
from llmopt.codegen.kernels import w4a16_gluon as g

block_m, block_n, split_k, stages = (int(v) for v in sys.argv[1:5])
kernel = g._w4_gluon_kernel
sig = {name: "i32" for name in kernel.arg_names}
sig.update(desc_w=f"tensordesc<u8[{block_n}, 64],{g._W_LAYOUT!r}>",
           desc_x=f"tensordesc<bf16[{block_m}, 128],{g._X_LAYOUT!r}>",
           s_ptr="*bf16", z_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32", count_ptr="*i32",
           GROUP_SIZE="constexpr", SPLIT_K="constexpr", STAGES="constexpr", HAS_BIAS="constexpr")
consts = {"GROUP_SIZE": 128, "SPLIT_K": split_k, "STAGES": stages, "HAS_BIAS": True}
compiled = triton_compile(GluonASTSource(kernel, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4})
ptx = compiled.asm["ptx"]
print(json.dumps({"ttgir": compiled.asm["ttgir"], "shared": compiled.metadata.shared,
                  "wgmma": ptx.count("wgmma.mma_async"), "byte_loads": ptx.count("ld.shared.b8") + ptx.count("ld.shared.u8"),
                  "bf16x2": ptx.count("sub.rn.bf16x2"), "cvt_to_float": ptx.count("cvt.rn.bf16.s") + ptx.count("cvt.rn.f32.s")}))
"""


@pytest.mark.parametrize("block_m, block_n, split_k, stages", [(8, 64, 4, 6), (64, 64, 1, 4), (16, 128, 2, 4)])
def test_gluon_w4_kernel_compiles_for_hopper_into_a_tma_producer_and_a_wgmma_consumer(block_m, block_n, split_k, stages):
    """Against the installed Triton (Gluon's API moves between releases): one producer warp, wgmma on the
    dequantized tile, the weight read as bytes straight into wgmma's operand layout (no layout conversion,
    no int-to-float instruction)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, str(block_m), str(block_n), str(split_k), str(stages)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "ttg.warp_specialize" in result["ttgir"] and "num_warps(1)" in result["ttgir"]
    assert "ttng.async_tma_copy_global_to_local" in result["ttgir"]
    assert result["shared"] <= 227 * 1024
    assert result["wgmma"] >= 8  # K = 128 a tile: eight k16 steps
    rows_per_thread = block_n // 64 * 2
    # each thread: its rows' 16 bytes of a 64-byte row (one more byte load outside the loop)
    assert rows_per_thread * 16 <= result["byte_loads"] <= rows_per_thread * 16 + 1
    assert result["bf16x2"] == rows_per_thread * 16  # one packed subtract a byte: two weights
    assert result["cvt_to_float"] == 0


def test_gluon_w4_kernel_is_only_taken_where_it_applies():
    from llmopt.codegen.kernels.w4a16_gluon import usable

    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    q = torch.zeros(8, 128, dtype=torch.uint8)
    assert not usable(x, q, 128, 4)  # no CUDA tensor here (and never on a GPU other than sm_90)


needs_hopper = pytest.mark.skipif(not HAS_HOPPER, reason="needs an sm_90 GPU: run `pytest -m gpu` on the H200/H100")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m, n, k, group_size, dtype, bias", [
    (1, 4096, 4096, 128, torch.bfloat16, False), (1, 11008, 4096, 128, torch.bfloat16, True),
    (1, 4096, 11008, 128, torch.bfloat16, False), (5, 1000, 1024, 128, torch.float16, True),
    (16, 4096, 4096, 256, torch.bfloat16, False), (33, 520, 384, 128, torch.bfloat16, True),
    (64, 11008, 4096, 128, torch.float16, False), (64, 4096, 11008, 128, torch.bfloat16, True),
])
def test_gluon_w4_kernel_gpu(poison, m, n, k, group_size, dtype, bias):
    from llmopt.codegen.kernels.w4a16_gluon import linear_w4_gluon, usable
    from llmopt.ops.linear_wq import dequantize_groups, pack_int4

    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)  # x: [M, K]
    qweight = pack_int4(torch.randint(0, 16, (n, k), device="cuda", generator=g))  # [N, K // 2]
    scales = (torch.rand(n, k // group_size, device="cuda", generator=g) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (n, k // group_size), device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g) if bias else None
    assert usable(x, qweight, group_size, 4)
    w = dequantize_groups(qweight, scales, zeros, group_size, 4).float()  # [N, K]
    ref = x.float() @ w.t() + (b.float() if bias else 0)
    for _ in range(2):  # twice: the split-K counters must have reset themselves
        y = linear_w4_gluon(x, qweight, scales, zeros, b, group_size)
        assert torch.isfinite(y).all()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < 4e-3, err
