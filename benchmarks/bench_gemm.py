"""Quantized GEMM kernels against torch bf16 matmul, at Llama-2-7B linear shapes.

Entry point: `run(ceilings) -> list[dict]`; `python -m benchmarks.bench_gemm` measures the ceilings
(benchmarks/common.py), runs every case and prints two tables. Each case times its baseline
(`x @ Wᵀ` with W in bf16) in the same run. Both sides are captured in a CUDA graph and timed as
graph replays (as the runtime runs decode steps), so Python's launch cost stays out of GPU times;
do_bench clears L2 before every repetition, so the weights come from HBM each time. Formulas:
- W4A16 (`linear_wq`, 4 bits, group 128, bf16; on sm_90 its Gluon kernels at M <= 8 (register-direct) and
  17 <= M <= 128 (wgmma), "config" names which): weight bytes = N·K/2 (nibbles) + 2·N·(K/128)·2
  (bf16 scales and zeros); GB/s = weight bytes / time; % BW = that over the measured copy
  bandwidth (read + write bytes of a large device copy). Two timings per side: one call per graph
  replay (which includes a fixed ~8 µs of graph launch and first memory round trip that both sides
  pay), and "stream": one graph replaying C calls back to back, each on its own copy of the weights
  (C copies hold at least 4× the L2 cache, so every call reads HBM), divided by C. The stream is
  how decode runs: one layer's linears after another inside a CUDA graph. "read floor" is the
  stream time of a kernel that only reads the same bytes (`benchmarks/read_floor.py`); "% of read
  floor" = floor / w4a16 stream time.
- W8A8 (`linear_w8a8`, per-token dynamic): int8 TOP/s = 2·M·N·K / GEMM time. "gemm" times the GEMM
  launch alone (activations already quantized), "total" adds the `quantize_rows` launch.
Targets: W4A16 M=1 >= 3.0x and >= 70% BW, M=16 >= 2.5x, M=64 >= 1.5x; W8A8 >= 1.6x. W4A16 at M = 128 and
2048 (prefill) shows `linear_wq`'s dequantize-then-cuBLAS path, for which no target is set.
"""
import torch

from benchmarks.common import header, measure_ceilings, print_table, rel_err, time_graph_ms
from benchmarks.read_floor import read_floor_ms
from llmopt.codegen.kernels.quantize_rows import quantize_rows
from llmopt.codegen.kernels.w4a16_gemm import (DECODE_MAX_M, FUSED_MAX_M, _wq_gemm_kernel, _wq_gemv_kernel, linear_wq,
                                               w4a16_direct, w4a16_wgmma)
from llmopt.codegen.kernels import w8a8_gemm
from llmopt.codegen.kernels.w8a8_gemm import int8_gemm_scaled, linear_w8a8
from llmopt.ops.linear_wq import dequantize_groups, pack_int4

LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K) of W: [N, K], y = x @ Wᵀ
WQ_BATCHES = [1, 16, 64, 128, 2048]  # decode batches, then prefill-sized M (dequantize + cuBLAS)
W8A8_TOKENS = [2048, 4096, 8192]
GROUP = 128
W4_COLUMNS = [
    "M", "N x K", "bf16 us", "w4a16 us", "speedup", "weight GB/s", "% BW",
    "bf16 us (stream)", "w4a16 us (stream)", "speedup (stream)", "weight GB/s (stream)", "% BW (stream)",
    "read floor us (stream)", "% of read floor", "rel err", "config",
]
W8_COLUMNS = [
    "M", "N x K", "bf16 TFLOP/s", "int8 TOP/s (gemm)", "speedup (gemm)", "speedup (total)",
    "gemm us", "quant us", "total us", "rel err", "config",
]


def _best(kernel) -> str:
    c = kernel.best_config
    return " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in c.kwargs.items()) + (
        f" w{c.num_warps} s{c.num_stages}"
    )


def _tma_config(q: torch.Tensor, n: int) -> str:
    """The TMA W8A8 kernel's kept choice for q [M, K] against [n, K] (bf16 out, no bias or residual)."""
    key = w8a8_gemm.tma_key(q, n, torch.bfloat16, {"HAS_BIAS": False, "HAS_RESIDUAL": False})
    shape = w8a8_gemm._tma_choices.get(key, q.device)
    if shape is w8a8_gemm.MISSING:
        return "not tuned"
    m, n, k, warps, stages, subtile, per_sm = shape
    return f"M={m} N={n} K={k} SUBTILE={subtile} PROGRAMS_PER_SM={per_sm} w{warps} s{stages}"


def w4_weights(n: int, k: int, group_size: int, dtype) -> tuple:
    """Random 4-bit weights as `linear_wq` takes them: qweight [N, K // 2] uint8, scales and zeros [N, K // G]."""
    qweight = pack_int4(torch.randint(0, 16, (n, k), device="cuda"))
    scales = (torch.rand(n, k // group_size, device="cuda") * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (n, k // group_size), device="cuda").to(dtype)
    return qweight, scales, zeros


def w4a16_case(m: int, n: int, k: int, ceilings: dict) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # x: [M, K]
    qweight, scales, zeros = w4_weights(n, k, GROUP, torch.bfloat16)
    w = dequantize_groups(qweight, scales, zeros, GROUP, 4)  # w: [N, K] bf16, the baseline's weight
    y = linear_wq(x, qweight, scales, zeros, None, GROUP, 4)
    err = rel_err(y, x @ w.t())
    t_ref = time_graph_ms([lambda: x @ w.t()])
    t = time_graph_ms([lambda: linear_wq(x, qweight, scales, zeros, None, GROUP, 4)])
    weight_bytes = n * k // 2 + 2 * n * (k // GROUP) * 2
    gbs = weight_bytes / t / 1e6
    direct = w4a16_direct.choose(x, qweight, GROUP, 4) if w4a16_direct is not None else None
    wgmma = w4a16_wgmma.choose(x, qweight, GROUP, 4) if w4a16_wgmma is not None else None
    if direct:
        config = f"direct KW={direct[0]} ROW_TILES={direct[1]}"
    elif wgmma:
        config = f"wgmma SPLIT_K={wgmma[0]} STAGES={wgmma[1]} ASYNC={wgmma[2]}"
    else:
        config = (_best(_wq_gemv_kernel if m <= DECODE_MAX_M else _wq_gemm_kernel) if m <= FUSED_MAX_M
                  else "dequantize + cuBLAS")
    copies = _stream_copies(weight_bytes)
    qws = [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(copies)]
    t_stream = time_graph_ms([lambda q=q: linear_wq(x, *q, None, GROUP, 4) for q in qws])
    del qws
    ws = [w.clone() for _ in range(copies)]
    t_ref_stream = time_graph_ms([lambda v=v: x @ v.t() for v in ws])
    del ws
    gbs_stream = weight_bytes / t_stream / 1e6
    t_floor = read_floor_ms(weight_bytes, copies) if m <= FUSED_MAX_M else None  # a floor for reading, not for compute
    return {
        "kind": "w4a16", "M": m, "N x K": f"{n} x {k}", "bf16 us": 1e3 * t_ref, "w4a16 us": 1e3 * t,
        "speedup": t_ref / t, "weight GB/s": gbs, "% BW": 100 * gbs / ceilings["bandwidth_gbs"],
        "bf16 us (stream)": 1e3 * t_ref_stream, "w4a16 us (stream)": 1e3 * t_stream, "speedup (stream)": t_ref_stream / t_stream,
        "weight GB/s (stream)": gbs_stream, "% BW (stream)": 100 * gbs_stream / ceilings["bandwidth_gbs"],
        "read floor us (stream)": 1e3 * t_floor if t_floor else "", "% of read floor": 100 * t_floor / t_stream if t_floor else "",
        "rel err": err, "config": config,
    }


def _stream_copies(weight_bytes: int) -> int:
    """Weight copies for a stream: at least 4× the L2 cache in int4 bytes, between 8 and 64."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(8, min(64, -(-4 * l2 // weight_bytes)))



def w8a8_case(m: int, n: int, k: int, ceilings: dict) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # x: [M, K]
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)  # w: [N, K]
    w_scale = torch.rand(n, device="cuda") * 0.01 + 1e-3  # [N] fp32
    w_bf16 = (w.float() * w_scale[:, None]).to(torch.bfloat16)  # the baseline's weight
    q, row_scale = quantize_rows(x)
    err = rel_err(linear_w8a8(x, w, w_scale, None, None), x @ w_bf16.t())
    t_ref = time_graph_ms([lambda: x @ w_bf16.t()])
    t_gemm = time_graph_ms([lambda: int8_gemm_scaled(q, w, row_scale, w_scale, None, None, torch.bfloat16)])
    t_quant = time_graph_ms([lambda: quantize_rows(x)])
    t_total = time_graph_ms([lambda: linear_w8a8(x, w, w_scale, None, None)])
    flops = 2 * m * n * k
    return {
        "kind": "w8a8", "M": m, "N x K": f"{n} x {k}", "bf16 TFLOP/s": flops / t_ref / 1e9,
        "int8 TOP/s (gemm)": flops / t_gemm / 1e9, "speedup (gemm)": t_ref / t_gemm,
        "speedup (total)": t_ref / t_total, "gemm us": 1e3 * t_gemm, "quant us": 1e3 * t_quant,
        "total us": 1e3 * t_total, "rel err": err, "config": _tma_config(q, n),
    }


def run(ceilings: dict) -> list:
    """All cases, W4A16 first; one dict per case (the table columns plus "kind")."""
    rows = [w4a16_case(m, n, k, ceilings) for m in WQ_BATCHES for n, k in LLAMA_7B]
    rows += [w8a8_case(m, n, k, ceilings) for m in W8A8_TOKENS for n, k in LLAMA_7B]
    return rows


if __name__ == "__main__":
    ceilings = measure_ceilings()
    print(header(ceilings), flush=True)
    rows = run(ceilings)
    print_table("W4A16 (group 128, bf16) vs bf16 matmul", W4_COLUMNS, [r for r in rows if r["kind"] == "w4a16"])
    print_table("W8A8 (per-token dynamic, bf16 out) vs bf16 matmul", W8_COLUMNS, [r for r in rows if r["kind"] == "w8a8"])
