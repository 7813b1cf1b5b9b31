"""The Gluon W4A16 kernel (`codegen/kernels/w4a16_gluon.py`) against torch bf16 matmul and the Triton kernel
`linear_wq` ships, at Llama-2-7B linear shapes, decode batches M = 1, 16, 32, 64.

Entry point: `python -m benchmarks.bench_w4_gluon [--sweep]`. All three are timed as "stream" replays (one CUDA
graph of C calls, each on its own weight copy, C copies >= 4x L2, divided by C; as `bench_gemm.py` does, so
every call reads HBM). "gluon" is the kernel's default config; with --sweep, every config of SWEEP is timed
too and the best is reported beside it (with its config). rel err: against x @ Wᵀ with W dequantized.
"""
import argparse
import itertools

import torch

from benchmarks.bench_gemm import GROUP, LLAMA_7B, _stream_copies
from benchmarks.common import header, measure_ceilings, print_table, rel_err, time_graph_ms
from llmopt.codegen.kernels import w4a16_gluon
from llmopt.codegen.kernels.w4a16_gemm import linear_wq
from llmopt.ops.linear_wq import dequantize_groups, pack_int4

BATCHES = [1, 16, 32, 64]
SWEEP = [(bn, sk, st) for bn, sk, st in itertools.product([64, 128], [1, 2, 4, 8], [3, 4, 6])]  # BLOCK_N, SPLIT_K, STAGES
COLUMNS = ["M", "N x K", "bf16 us", "triton us", "gluon us", "gluon vs bf16", "gluon vs triton", "gluon GB/s",
           "% BW", "best sweep us", "best vs bf16", "best config", "rel err"]


def case(m: int, n: int, k: int, ceilings: dict, sweep: bool) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # x: [M, K]
    qweight = pack_int4(torch.randint(0, 16, (n, k), device="cuda"))  # [N, K // 2] uint8
    scales = (torch.rand(n, k // GROUP, device="cuda") * 0.02 + 0.005).to(torch.bfloat16)  # [N, K // G]
    zeros = torch.randint(0, 16, (n, k // GROUP), device="cuda").to(torch.bfloat16)
    w = dequantize_groups(qweight, scales, zeros, GROUP, 4)  # [N, K] bf16
    ref = x @ w.t()
    err = rel_err(w4a16_gluon.linear_w4_gluon(x, qweight, scales, zeros, None, GROUP), ref)
    weight_bytes = n * k // 2 + 2 * n * (k // GROUP) * 2
    copies = _stream_copies(weight_bytes)
    qws = [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(copies)]
    t_triton = time_graph_ms([lambda q=q: linear_wq(x, *q, None, GROUP, 4) for q in qws])
    t_gluon = time_graph_ms([lambda q=q: w4a16_gluon.linear_w4_gluon(x, *q, None, GROUP) for q in qws])
    best, best_cfg = None, ""
    if sweep:
        block_m = max(8, 1 << (m - 1).bit_length())
        for bn, sk, st in SWEEP:
            cfg = (block_m, bn, sk, st)
            try:
                e = rel_err(w4a16_gluon.linear_w4_gluon(x, qweight, scales, zeros, None, GROUP, cfg), ref)
            except Exception as exc:  # a config the compiler or the GPU refuses (registers, shared memory)
                print(f"config {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            if not e <= 1e-2:  # NaN too
                print(f"config {cfg}: rel err {e:.3g}, skipped")
                continue
            t = time_graph_ms([lambda q=q: w4a16_gluon.linear_w4_gluon(x, *q, None, GROUP, cfg) for q in qws])
            if best is None or t < best:
                best, best_cfg = t, f"N={bn} SPLIT_K={sk} STAGES={st}"
    del qws
    ws = [w.clone() for _ in range(copies)]
    t_ref = time_graph_ms([lambda v=v: x @ v.t() for v in ws])
    del ws
    gbs = weight_bytes / t_gluon / 1e6
    return {
        "M": m, "N x K": f"{n} x {k}", "bf16 us": 1e3 * t_ref, "triton us": 1e3 * t_triton, "gluon us": 1e3 * t_gluon,
        "gluon vs bf16": t_ref / t_gluon, "gluon vs triton": t_triton / t_gluon, "gluon GB/s": gbs,
        "% BW": 100 * gbs / ceilings["bandwidth_gbs"], "best sweep us": 1e3 * best if best else "",
        "best vs bf16": t_ref / best if best else "", "best config": best_cfg, "rel err": err,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="also time every config of SWEEP")
    args = parser.parse_args()
    ceilings = measure_ceilings()
    rows = [case(m, n, k, ceilings, args.sweep) for m in BATCHES for n, k in LLAMA_7B]
    print_table(f"W4A16 Gluon kernel vs bf16 and the Triton kernel, stream timing ({header(ceilings)})", COLUMNS, rows)


if __name__ == "__main__":
    main()
