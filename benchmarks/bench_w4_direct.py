"""The register-direct W4A16 decode kernel (`codegen/kernels/w4a16_direct.py`) beside the shipped Triton kernel and bf16.

Entry point: `python -m benchmarks.bench_w4_direct`: checks the kernel against the reference op on odd
shapes, then times Llama-2-7B shapes at M = 1, 4, 8 as streams (bench_gemm's "stream": C weight copies, at least
4x the L2 cache, one graph of C calls, divided by C): every config of the direct kernel (`CONFIGS`; "chosen" is
the one `choose` tuned) beside `linear_wq`'s autotuned Triton kernel (`linear_wq` with the direct kernel turned off) and
`x @ Wᵀ` in bf16, all in this run. Prints tables.
"""
import itertools

import torch

from benchmarks.bench_gemm import GROUP, LLAMA_7B, _stream_copies, w4_weights
from benchmarks.common import print_table, rel_err, time_graph_ms
from llmopt.codegen.kernels.w4a16_direct import CONFIGS, choose, linear_w4_direct
from llmopt.codegen.kernels import w4a16_gemm
from llmopt.ops.linear_wq import dequantize_groups

CHECK_SHAPES = [(1, 4096, 4096, 128), (3, 100, 384, 128), (8, 4100, 11008, 128), (7, 77, 1024, 256),
                (5, 33, 128, 128), (2, 64, 256, 256)]


def check() -> list:
    rows = []
    for (m, n, k, g), dtype, with_bias in itertools.product(CHECK_SHAPES, (torch.bfloat16, torch.float16), (False, True)):
        qweight, scales, zeros = w4_weights(n, k, g, dtype)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
        w = dequantize_groups(qweight, scales, zeros, g, 4).float()  # [N, K]
        ref = x.float() @ w.t() + (bias.float() if with_bias else 0)
        y = linear_w4_direct(x, qweight, scales, zeros, bias, g)
        again = linear_w4_direct(x, qweight, scales, zeros, bias, g)
        rows.append({"M": m, "N": n, "K": k, "G": g, "dtype": str(dtype)[6:], "bias": with_bias,
                     "config": choose(x, qweight, g, 4), "rel err": rel_err(y, ref), "same twice": bool(torch.equal(y, again)),
                     "finite": bool(y.isfinite().all())})
    return rows


def _triton_kernel(x, qweight, scales, zeros):
    """linear_wq's Triton path, whatever linear_wq would choose (the direct kernel turned off for the call)."""
    direct, w4a16_gemm.w4a16_direct = w4a16_gemm.w4a16_direct, None
    try:
        return w4a16_gemm.linear_wq(x, qweight, scales, zeros, None, GROUP, 4)
    finally:
        w4a16_gemm.w4a16_direct = direct


def bench() -> list:
    rows = []
    for m, (n, k) in itertools.product((1, 4, 8), LLAMA_7B):
        qweight, scales, zeros = w4_weights(n, k, GROUP, torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = dequantize_groups(qweight, scales, zeros, GROUP, 4)  # [N, K] bf16, the baseline's weight
        weight_bytes = n * k // 2 + 2 * n * (k // GROUP) * 2
        copies = _stream_copies(weight_bytes)
        chosen = choose(x, qweight, GROUP, 4)
        qws = [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(copies)]
        t_triton = time_graph_ms([lambda q=q: _triton_kernel(x, *q) for q in qws])
        times = {cfg: time_graph_ms([lambda q=q: linear_w4_direct(x, *q, None, GROUP, cfg) for q in qws])
                 for cfg in CONFIGS}
        err = rel_err(linear_w4_direct(x, qweight, scales, zeros, None, GROUP, chosen), x @ w.t())
        del qws
        ws = [w.clone() for _ in range(copies)]
        t_bf16 = time_graph_ms([lambda v=v: x @ v.t() for v in ws])
        del ws
        t = times[chosen]
        rows.append({"M": m, "N x K": f"{n} x {k}", "bf16 us": 1e3 * t_bf16, "triton us": 1e3 * t_triton,
                     "direct us": 1e3 * t, "chosen config": chosen, "best config": min(times, key=times.get),
                     "direct / bf16": t_bf16 / t, "triton / bf16": t_bf16 / t_triton, "direct / triton": t_triton / t,
                     "direct GB/s": weight_bytes / t / 1e6, "rel err": err,
                     "all configs us": " ".join(f"{c}: {1e3 * v:.2f}" for c, v in times.items())})
    return rows


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    checks = check()
    print_table("direct W4A16 kernel vs reference (fp32 product of the dequantized weight)", list(checks[0]), checks)
    rows = bench()
    print_table("W4A16 stream, us (direct kernel vs shipped Triton kernel vs bf16)", list(rows[0]), rows)
