"""Scratch: the old wgmma kernel (x staged through registers, every config) beside the new one's chosen config."""
import itertools, sys
import torch
from benchmarks.bench_gemm import GROUP, LLAMA_7B, _stream_copies, w4_weights
from benchmarks.common import print_table, time_graph_ms
from llmopt.codegen.kernels import w4a16_wgmma as new
from scratch_s17 import w4a16_wgmma_old as old, w4a16_wgmma_b as vb, w4a16_wgmma_c as vc
from llmopt.ops.linear_wq import dequantize_groups
from benchmarks.common import rel_err
from benchmarks.bench_w4_kernels import _without_gluon

ms = [int(a) for a in sys.argv[1:]] or [32, 64, 128]
rows = []
for m, (n, k) in itertools.product(ms, LLAMA_7B):
    qweight, scales, zeros = w4_weights(n, k, GROUP, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    copies = _stream_copies(n * k // 2 + 2 * n * (k // GROUP) * 2)
    chosen = new.choose(x, qweight, GROUP, 4) if m >= new.MIN_M else (4, 4, True)
    qws = [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(copies)]
    t_old = {c: time_graph_ms([lambda q=q: old.linear_w4_wgmma(x, *q, None, GROUP, c) for q in qws]) for c in old.CONFIGS}
    t_all = {c: time_graph_ms([lambda q=q: new.linear_w4_wgmma(x, *q, None, GROUP, c) for q in qws]) for c in new.CONFIGS}
    print({"M": m, "N": n, "K": k, **{str(c): round(1e3 * t, 2) for c, t in t_all.items()}}, flush=True)
    t_b = {c: time_graph_ms([lambda q=q: vb.linear_w4_wgmma(x, *q, None, GROUP, c) for q in qws]) for c in vb.CONFIGS}
    print({"B": 1, "M": m, "N": n, "K": k, **{str(c): round(1e3 * t, 2) for c, t in t_b.items()}}, flush=True)
    bb = min(t_b, key=t_b.get)
    t_c = {c: time_graph_ms([lambda q=q: vc.linear_w4_wgmma(x, *q, None, GROUP, c) for q in qws]) for c in vc.CONFIGS}
    print({"C": 1, "M": m, "N": n, "K": k, **{str(c): round(1e3 * t, 2) for c, t in t_c.items()}}, flush=True)
    bc = min(t_c, key=t_c.get)
    t_new = t_all.get(chosen) or time_graph_ms([lambda q=q: new.linear_w4_wgmma(x, *q, None, GROUP, chosen) for q in qws])
    w = dequantize_groups(qweight, scales, zeros, GROUP, 4)
    ref = x.float() @ w.float().t()
    err = rel_err(new.linear_w4_wgmma(x, qweight, scales, zeros, None, GROUP, chosen), ref)
    err_b = max(rel_err(vb.linear_w4_wgmma(x, qweight, scales, zeros, None, GROUP, c), ref) for c in vb.CONFIGS)
    err_c = max(rel_err(vc.linear_w4_wgmma(x, qweight, scales, zeros, None, GROUP, c), ref) for c in vc.CONFIGS)
    t_without = time_graph_ms([lambda q=q: _without_gluon(x, *q) for q in qws])
    del qws
    ws = [w.clone() for _ in range(copies)]
    t_bf16 = time_graph_ms([lambda v=v: x @ v.t() for v in ws])
    del ws
    bo = min(t_old, key=t_old.get)
    rows.append({"M": m, "N x K": f"{n} x {k}", "old best us": 1e3 * t_old[bo], "old cfg": bo, "new us": 1e3 * t_new,
                 "new cfg": chosen, "new best us": 1e3 * min(t_all.values()), "new best cfg": min(t_all, key=t_all.get), "new / old": t_old[bo] / t_new, "bf16 us": 1e3 * t_bf16, "new / bf16": t_bf16 / t_new,
                 "old / bf16": t_bf16 / t_old[bo], "without / bf16": t_bf16 / t_without, "best new / without": t_without / min(t_all.values()), "new rel err": err, "B best us": 1e3 * t_b[bb], "B cfg": bb, "B / new best": min(t_all.values()) / t_b[bb], "B max rel err": err_b, "C best us": 1e3 * t_c[bc], "C cfg": bc, "C / new best": min(t_all.values()) / t_c[bc], "C max rel err": err_c, "C / bf16": t_bf16 / t_c[bc]})
    print(rows[-1], flush=True)
print(torch.cuda.get_device_name())
print_table("old wgmma kernel (best config) vs new (chosen), stream us", list(rows[0]), rows)
