"""W8A8 at decode sizes (M <= 16) against torch bf16 matmul, and against the prefill tiles it used before.

Entry point: `python -m benchmarks.bench_w8a8_decode [--m 1,4,16]`. For each M and Llama-2-7B shape, in one run:
`x @ Wᵀ` in bf16; the int8 GEMM (`int8_gemm_scaled`, activations quantized already, as lowering runs it) with its
decode configs (16-row tiles, split K; `codegen/kernels/w8a8_gemm.py`), and with the prefill-sized pointer tiles
(`DECODE_MAX_M` set to 0 for the call: what ran before); and `linear_w8a8` (the activation quantization's launch
added). Every case is timed as a stream (bench_gemm's: C weight copies, at least 4x the L2 cache, one CUDA graph
of C calls, divided by C), so each call reads its weight from HBM as a decode step's linears do. GB/s counts the
int8 weight bytes; "% BW" is that over the measured copy bandwidth. Prints a table.
"""
import argparse
import itertools

import torch

from benchmarks.bench_gemm import LLAMA_7B, _stream_copies
from benchmarks.common import header, measure_ceilings, print_table, rel_err, time_graph_ms
from llmopt.codegen.kernels import w8a8_gemm
from llmopt.codegen.kernels.quantize_rows import quantize_rows

COLUMNS = ["M", "N x K", "bf16 us", "decode us", "prefill tiles us", "total us", "decode / bf16",
           "total / bf16", "decode / prefill tiles", "GB/s", "% BW", "rel err"]


def _stream_us(call, weights: list) -> float:
    """µs a call of `call(weight)` over the weight copies, back to back in one graph."""
    return 1e3 * time_graph_ms([lambda w=w: call(w) for w in weights])


def case(m: int, n: int, k: int, ceilings: dict) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # x: [M, K]
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)  # w: [N, K]
    w_scale = torch.rand(n, device="cuda") * 0.01 + 1e-3  # [N] fp32
    w_bf16 = (w.float() * w_scale[:, None]).to(torch.bfloat16)  # the baseline's weight
    q, row_scale = quantize_rows(x)  # [M, K] int8, [M, 1] fp32
    copies = _stream_copies(n * k)
    gemm = lambda pair: w8a8_gemm.int8_gemm_scaled(q, pair[0], row_scale, pair[1], None, None, torch.bfloat16)
    int8s = [(w.clone(), w_scale.clone()) for _ in range(copies)]
    t_decode = _stream_us(gemm, int8s)
    saved = w8a8_gemm.DECODE_MAX_M
    w8a8_gemm.DECODE_MAX_M = 0  # the prefill-sized pointer tiles, no split K
    try:
        t_prefill_tiles = _stream_us(gemm, int8s)
    finally:
        w8a8_gemm.DECODE_MAX_M = saved
    t_total = _stream_us(lambda pair: w8a8_gemm.linear_w8a8(x, pair[0], pair[1], None, None), int8s)
    err = rel_err(w8a8_gemm.linear_w8a8(x, w, w_scale, None, None), x @ w_bf16.t())
    del int8s
    t_bf16 = _stream_us(lambda v: x @ v.t(), [w_bf16.clone() for _ in range(copies)])
    gbs = n * k / t_decode / 1e3
    return {"M": m, "N x K": f"{n} x {k}", "bf16 us": t_bf16, "decode us": t_decode,
            "prefill tiles us": t_prefill_tiles, "total us": t_total, "decode / bf16": t_bf16 / t_decode,
            "total / bf16": t_bf16 / t_total, "decode / prefill tiles": t_prefill_tiles / t_decode,
            "GB/s": gbs, "% BW": 100 * gbs / ceilings["bandwidth_gbs"], "rel err": err}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=lambda text: [int(v) for v in text.split(",")], default=[1, 4, 16])
    args = parser.parse_args()
    ceilings = measure_ceilings()
    print(header(ceilings), flush=True)
    rows = [case(m, n, k, ceilings) for m, (n, k) in itertools.product(args.m, LLAMA_7B)]
    print_table("W8A8 at decode sizes (bf16 out), streams", COLUMNS, rows)


if __name__ == "__main__":
    main()
