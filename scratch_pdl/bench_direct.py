"""Scratch: the direct W4A16 kernel with programmatic dependent launch (PDL), modes 0 off / 1 trigger at start /
2 trigger after the loop / 3 implicit trigger, every config, stream us, beside bf16 and the read floor; then a
chain check (each call's x is the previous call's y: PDL output must equal PDL-off output bit for bit), and a
chain behind a non-PDL norm kernel (python -m scratch_pdl.bench_direct)."""
import itertools, sys
import torch
from benchmarks.bench_gemm import GROUP, LLAMA_7B, _stream_copies, w4_weights
from benchmarks.common import print_table, rel_err, time_graph_ms
from benchmarks.read_floor import read_floor_ms
from llmopt.codegen.kernels.rmsnorm import residual_rmsnorm
from llmopt.ops.linear_wq import dequantize_groups
from scratch_pdl import direct_pdl as D

MODES = (0, 1, 2, 3)
rows = []
for m, (n, k) in itertools.product([1, 8], LLAMA_7B):
    qweight, scales, zeros = w4_weights(n, k, GROUP, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    nbytes = n * k // 2 + 2 * n * (k // GROUP) * 2
    copies = _stream_copies(nbytes)
    qws = [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(copies)]
    t = {(p, c): time_graph_ms([lambda q=q, c=c, p=p: D.linear_w4_direct(x, *q, None, GROUP, c, p) for q in qws])
         for p in MODES for c in D.CONFIGS}
    print({"M": m, "N": n, "K": k, **{str(c): round(1e3 * v, 2) for c, v in t.items()}}, flush=True)
    best = {p: min((c for c in t if c[0] == p), key=t.get) for p in MODES}
    # behind a norm kernel (no PDL of its own): [norm, gemv] per copy, modes 0 and the best PDL mode
    nw = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    bp = min(MODES[1:], key=lambda p: t[best[p]])
    tn = {p: time_graph_ms([f for q in qws for f in (lambda: residual_rmsnorm(x, None, nw, 1e-6),
                                                     lambda q=q, p=p: D.linear_w4_direct(x, *q, None, GROUP, best[p][1], p))])
          for p in (0, bp)}
    tnorm = time_graph_ms([lambda: residual_rmsnorm(x, None, nw, 1e-6) for _ in qws])
    del qws
    w = dequantize_groups(qweight, scales, zeros, GROUP, 4)
    ref = x.float() @ w.float().t()
    err = max(rel_err(D.linear_w4_direct(x, qweight, scales, zeros, None, GROUP, c, p), ref) for c in D.CONFIGS for p in MODES)
    ws = [w.clone() for _ in range(copies)]
    t_bf16 = time_graph_ms([lambda v=v: x @ v.t() for v in ws])
    del ws
    t_floor = read_floor_ms(nbytes, copies)
    row = {"M": m, "N x K": f"{n} x {k}", "bf16 us": 1e3 * t_bf16, "floor us": 1e3 * t_floor}
    for p in MODES:
        row[f"pdl{p} us"] = 1e3 * t[best[p]]
        row[f"pdl{p} cfg"] = best[p][1]
    row.update({"best pdl / off": t[best[0]] / t[best[bp]], "off / bf16": t_bf16 / t[best[0]],
                "best pdl / bf16": t_bf16 / t[best[bp]], "best pdl % floor": 100 * t_floor / t[best[bp]],
                "norm us": 1e3 * tnorm, "norm+gemv off us": 1e3 * tn[0], f"norm+gemv pdl{bp} us": 1e3 * tn[bp],
                "rel err": err})
    rows.append(row)
print(torch.cuda.get_device_name())
print_table("Direct W4A16 kernel with programmatic dependent launch, best config each, stream us", list(rows[0]), rows)

# chain check: y_i = gemv_i(x_i), x_{i+1} = y_i (square shape), eager and graph-replayed, PDL vs off: bit-equal
n = k = 4096
qws = [w4_weights(n, k, GROUP, torch.bfloat16) for _ in range(6)]
for m in (1, 8):
    x0 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for c in D.CONFIGS:
        outs = {}
        for p in MODES:
            def chain():
                h = x0
                for q in qws:
                    h = D.linear_w4_direct(h, *q, None, GROUP, c, p)
                return h
            eager = chain()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = chain()
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            outs[p] = (eager.clone(), out.clone())
        same = all(torch.equal(outs[p][i], outs[0][0]) for p in MODES for i in (0, 1))
        print("chain", m, c, "bit-equal" if same else "MISMATCH", flush=True)
