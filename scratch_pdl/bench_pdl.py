"""Scratch: the direct (M = 1, 8) and wgmma (M = 16, 64) W4A16 kernels with programmatic dependent launch. Modes:
0 off; 1 trigger at start, first weight blocks loaded before griddepcontrol.wait; 2 (direct) trigger after the loop;
4 trigger and wait at the start (no load before the wait). Best config each, stream us, beside bf16 and the read
floor; then chain checks, PDL output bit-equal to PDL off (python -m scratch_pdl.bench_pdl)."""
import itertools
import torch
from benchmarks.bench_gemm import GROUP, LLAMA_7B, _stream_copies, w4_weights
from benchmarks.common import print_table, rel_err, time_graph_ms
from benchmarks.read_floor import read_floor_ms
from llmopt.ops.linear_wq import dequantize_groups


from scratch_pdl.bench_pdl_kinds import KINDS
rows = []
for m, (n, k) in itertools.product([1, 8, 64], LLAMA_7B):
    kind = "direct" if m <= 8 else "wgmma"
    fn, configs, modes = KINDS[kind]
    qweight, scales, zeros = w4_weights(n, k, GROUP, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    nbytes = n * k // 2 + 2 * n * (k // GROUP) * 2
    copies = _stream_copies(nbytes)
    qws = [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(copies)]
    t = {(p, c): time_graph_ms([lambda q=q, c=c, p=p: fn(x, *q, None, GROUP, c, p) for q in qws])
         for p in modes for c in configs}
    print({"M": m, "N": n, "K": k, **{str(c): round(1e3 * v, 2) for c, v in t.items()}}, flush=True)
    del qws
    best = {p: min((c for c in t if c[0] == p), key=t.get) for p in modes}
    w = dequantize_groups(qweight, scales, zeros, GROUP, 4)
    ref = x.float() @ w.float().t()
    err = max(rel_err(fn(x, qweight, scales, zeros, None, GROUP, c, p), ref) for c in configs for p in modes)
    ws = [w.clone() for _ in range(copies)]
    t_bf16 = time_graph_ms([lambda v=v: x @ v.t() for v in ws])
    del ws
    t_floor = read_floor_ms(nbytes, copies)
    row = {"M": m, "N x K": f"{n} x {k}", "kernel": kind, "bf16 us": 1e3 * t_bf16, "floor us": 1e3 * t_floor}
    for p in (0, 1, 2, 4):
        row[f"mode {p} us"] = 1e3 * t[best[p]] if p in best else ""
    row.update({"mode 1 / off": t[best[0]] / t[best[1]], "mode 4 / off": t[best[0]] / t[best[4]],
                "off / bf16": t_bf16 / t[best[0]], "mode 1 / bf16": t_bf16 / t[best[1]],
                "mode 4 / bf16": t_bf16 / t[best[4]], "mode 4 % floor": 100 * t_floor / t[best[4]],
                "mode 4 cfg": best[4][1], "rel err": err})
    rows.append(row)
import os
from llmopt.codegen.kernels import w4a16_gemm
w4a16_gemm.w4a16_direct = w4a16_gemm.w4a16_wgmma = None  # the Triton kernel
for m, (n, k) in itertools.product([16], LLAMA_7B):
    qweight, scales, zeros = w4_weights(n, k, GROUP, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    nbytes = n * k // 2 + 2 * n * (k // GROUP) * 2
    copies = _stream_copies(nbytes)
    qws = [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(copies)]
    t = {}
    for p in ("0", "1", "0", "1"):
        os.environ["LLMOPT_PDL"] = p
        t[p] = min(t.get(p, 1e9), time_graph_ms([lambda q=q: w4a16_gemm.linear_wq(x, *q, None, GROUP, 4) for q in qws]))
    del qws
    t_floor = read_floor_ms(nbytes, copies)
    rows.append({"M": m, "N x K": f"{n} x {k}", "kernel": "triton", "floor us": 1e3 * t_floor,
                 "mode 0 us": 1e3 * t["0"], "mode 4 us": 1e3 * t["1"], "mode 4 / off": t["0"] / t["1"],
                 "mode 4 % floor": 100 * t_floor / t["1"]})
os.environ["LLMOPT_PDL"] = "1"
print(torch.cuda.get_device_name())
columns = list(dict.fromkeys(c for r in rows for c in r))
print_table("W4A16 kernels with programmatic dependent launch, best config each, stream us", columns,
            rows)

# chain checks: y_i = kernel_i(x_i), x_{i+1} = y_i (square shape), eager and graph-replayed: PDL bit-equal to off
n = k = 4096
qws = [w4_weights(n, k, GROUP, torch.bfloat16) for _ in range(6)]
for m in (1, 64):
    kind = "direct" if m <= 8 else "wgmma"
    fn, configs, modes = KINDS[kind]
    x0 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for c in configs:
        outs = {}
        for p in modes:
            def chain():
                h = x0
                for q in qws:
                    h = fn(h, *q, None, GROUP, c, p)
                return h
            eager = chain()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = chain()
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            outs[p] = (eager.clone(), out.clone())
        same = all(torch.equal(outs[p][i], outs[0][0]) for p in modes for i in (0, 1))
        print("chain", kind, m, c, "bit-equal" if same else "MISMATCH", flush=True)
