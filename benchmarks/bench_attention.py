"""Benchmark of the attention and norm kernels against PyTorch, on one CUDA GPU.

Entry point: `run(ceilings) -> list[dict]` (one row per case; `ceilings` from
`benchmarks.common.measure_ceilings()`); `python -m benchmarks.bench_attention` measures the ceilings and
prints four tables:
- prefill: causal attention, head dim 128, bf16, 32 heads, ~16k tokens per batch, against
  `scaled_dot_product_attention` on its fastest backend (flash or cuDNN); causal FLOPs = 2*2*B*H*T*T*D/2;
  `flash_attention` as the lowering calls it ("kernel" names the one it took: the Gluon kernel on the
  H200 where usable) and, side by side, Triton's warp-specialized Hopper kernel (`kernel="warp_specialized"`,
  head dim 128 only) and the portable kernel (`kernel="portable"`);
- prefill at other head dims (64, 96 in padded tiles, 256 with 16 heads), T=4096, the same way;
- decode: paged attention, GQA 32/8 heads, D=128, bf16, block size 16, every sequence at the full
  context; bytes = the K and V rows read (B*ctx*Hkv*D*2 tensors*2 bytes), against the measured copy
  bandwidth; for context, SDPA decoding over a contiguous (unpaged) cache;
- norm: residual add + RMSNorm (+ int8 quant), K=4096, bf16, against eager PyTorch; bytes = x and
  residual read, h and y written (+ q and the scales), the weight once.
Decode and norm calls last tens of microseconds, less than the host takes to launch them: they are
timed as CUDA graph replays (as the runtime runs decode steps). Norm: over enough copies of the inputs
that one replay moves >= 256 MB, four times the L2. Decode, two ways: "1 call" replays a graph of one
call (so each timing carries the graph's launch latency, ~8 µs on the H200), "stream" replays four
calls back to back over two copies of the cache (each call reads >= 268 MB, so nothing stays in L2),
per call: how attention runs layer after layer in a captured decode step. SDPA is timed the same two ways.
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import header, measure_ceilings, print_table, rel_err, time_graph_ms, time_ms
from llmopt.codegen.kernels import flash_attention_hopper
from llmopt.codegen.kernels.flash_attention import flash_attention
from llmopt.codegen.kernels.paged_attention import paged_attention
from llmopt.codegen.kernels.rmsnorm import residual_rmsnorm, residual_rmsnorm_torch
from llmopt.ops import quantize_per_token

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def _copies(n_bytes: int) -> int:
    return max(1, math.ceil(256e6 / n_bytes))


def _best_sdpa(q, k, v, **kwargs):
    """(ms, backend name) of SDPA's fastest backend among flash and cuDNN on these inputs."""
    best = (float("inf"), "none")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        def call(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        try:
            call()
        except RuntimeError as e:  # this backend does not take these inputs
            print(f"sdpa {backend.name}: unavailable ({str(e).splitlines()[0][:80]})")
            continue
        best = min(best, (time_ms(call), backend.name.lower()))
    return best


def _prefill_row(ceilings, batch: int, heads: int, seq: int, head_dim: int, case: str) -> dict:
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = head_dim**-0.5
    flops = 4 * batch * heads * seq * seq * head_dim / 2
    ours = time_ms(lambda: flash_attention(q, k, v, scale, True))
    portable = time_ms(lambda: flash_attention(q, k, v, scale, True, kernel="portable"))
    triton_ws = None
    if flash_attention_hopper.choose(q, k, v, True, "warp_specialized"):
        triton_ws = time_ms(lambda: flash_attention(q, k, v, scale, True, kernel="warp_specialized"))
    sdpa_ms, backend = _best_sdpa(q, k, v, is_causal=True, scale=scale)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return {
        "case": case, "kernel": flash_attention_hopper.choose(q, k, v, True) or "portable",
        "ms": ours, "TFLOP/s": flops / ours / 1e9,
        "sdpa ms": sdpa_ms, "sdpa TFLOP/s": flops / sdpa_ms / 1e9, "sdpa backend": backend,
        "speedup": sdpa_ms / ours, "% of matmul": 100 * flops / ours / 1e9 / ceilings["bf16_tflops"],
        "triton ws ms": triton_ws or "", "triton ws speedup": sdpa_ms / triton_ws if triton_ws else "",
        "portable ms": portable, "portable speedup": sdpa_ms / portable,
        "rel err": rel_err(flash_attention(q, k, v, scale, True), ref),
    }


def bench_prefill(ceilings) -> list:
    return [_prefill_row(ceilings, max(1, 16384 // seq), HEADS, seq, HEAD_DIM, f"B={max(1, 16384 // seq)} T={seq}")
            for seq in (1024, 2048, 4096, 8192, 16384)]


def bench_prefill_head_dims(ceilings) -> list:
    """Other families' head dims at T=4096: 64 (GPT-2, Pythia), 96 (Phi-3: padded tiles), 256 (Gemma, 16 heads)."""
    return [_prefill_row(ceilings, 4, heads, 4096, head_dim, f"B=4 T=4096 D={head_dim} H={heads}")
            for head_dim, heads in ((64, 32), (96, 32), (256, 16))]


def bench_decode(ceilings) -> list:
    rows = []
    for ctx in (4096, 8192, 32768):
        for batch in (16, 32, 64):
            blocks = ctx // PAGE
            caches = [tuple(torch.randn(batch * blocks, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                            for _ in range(2)) for _ in range(2)]  # 2 copies of (k_cache, v_cache)
            block_tables = torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).reshape(batch, blocks)
            seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            scale = HEAD_DIM**-0.5
            n_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2  # K and V rows, bf16
            ours = lambda kv: paged_attention(q, *kv, block_tables, seq_lens, scale)
            ours_1 = time_graph_ms([lambda: ours(caches[0])])
            ours_stream = time_graph_ms([lambda kv=kv: ours(kv) for kv in caches * 2])
            out = ours(caches[0])  # [B, Hq, D]
            # the same caches laid out contiguously, [B, Hkv, ctx, D] each, for SDPA
            flats = [tuple(c[block_tables.long()].reshape(batch, ctx, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous() for c in kv)
                     for kv in caches]
            del caches
            sdpa = lambda kv: F.scaled_dot_product_attention(q[:, :, None], *kv, scale=scale, enable_gqa=True)
            sdpa_1 = time_graph_ms([lambda: sdpa(flats[0])])
            sdpa_stream = time_graph_ms([lambda kv=kv: sdpa(kv) for kv in flats * 2])
            gbs = lambda ms: n_bytes / ms / 1e6
            rows.append({
                "case": f"B={batch} ctx={ctx}", "us (1 call)": 1e3 * ours_1,
                "% of copy (1 call)": 100 * gbs(ours_1) / ceilings["bandwidth_gbs"],
                "us (stream)": 1e3 * ours_stream, "GB/s (stream)": gbs(ours_stream),
                "% of copy (stream)": 100 * gbs(ours_stream) / ceilings["bandwidth_gbs"],
                "sdpa (unpaged) us, 1 call / stream": f"{1e3 * sdpa_1:.1f} / {1e3 * sdpa_stream:.1f}",
                "vs sdpa (stream)": sdpa_stream / ours_stream, "rel err": rel_err(out, sdpa(flats[0])[:, :, 0]),
            })
            del flats
            torch.cuda.empty_cache()
    return rows


def bench_norm(ceilings) -> list:
    rows, k = [], 4096
    for m in (4096, 8192, 16384):
        weight = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        for quantize in (False, True):
            n_bytes = 4 * m * k * 2 + k * 2 + (m * k + m * 4 if quantize else 0)
            sets = [[torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)] for _ in range(_copies(n_bytes))]
            ours = time_graph_ms([lambda x=x, r=r: residual_rmsnorm(x, r, weight, 1e-6, quantize=quantize) for x, r in sets])
            if quantize:
                eager = time_graph_ms([lambda x=x, r=r: quantize_per_token(residual_rmsnorm_torch(x, r, weight, 1e-6)[0]) for x, r in sets])
            else:
                eager = time_graph_ms([lambda x=x, r=r: residual_rmsnorm_torch(x, r, weight, 1e-6) for x, r in sets])
            x, residual = sets[0]
            y = residual_rmsnorm(x, residual, weight, 1e-6, quantize=quantize).y
            rows.append({
                "case": f"M={m} K={k}" + (" +quant" if quantize else ""), "ms": ours, "GB/s": n_bytes / ours / 1e6,
                "% of copy": 100 * n_bytes / ours / 1e6 / ceilings["bandwidth_gbs"],
                "eager ms": eager, "speedup": eager / ours,
                "rel err": rel_err(y, residual_rmsnorm_torch(x, residual, weight, 1e-6)[0]),
            })
            del sets, x, residual
    return rows


TABLES = ("prefill", "prefill_dims", "decode", "norm")


def run(ceilings, tables=TABLES) -> list:
    """The cases of `tables` (all by default), each row tagged with its table."""
    rows = []
    benches = {"prefill": bench_prefill, "prefill_dims": bench_prefill_head_dims, "decode": bench_decode, "norm": bench_norm}
    for table in tables:
        rows += [{"table": table, **row} for row in benches[table](ceilings)]
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, from {', '.join(TABLES)}")
    tables = parser.parse_args().tables.split(",")
    ceilings = measure_ceilings()
    print(header(ceilings), flush=True)
    rows = run(ceilings, tables)
    for table, title in (("prefill", "prefill attention, causal, D=128, bf16, 32 heads (ours vs best SDPA)"),
                         ("prefill_dims", "prefill attention, causal, other head dims, bf16 (ours vs best SDPA)"),
                         ("decode", "paged decode attention, 32 q / 8 kv heads, D=128, bf16, block 16"),
                         ("norm", "residual add + RMSNorm (+ int8 per-token quant), bf16")):
        part = [r for r in rows if r["table"] == table]
        if part:
            print_table(title, [c for c in part[0] if c != "table"], part)
