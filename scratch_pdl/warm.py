"""Scratch: compile the PDL kernels' configs and modes in parallel (INDEX COUNT)."""
import sys
import torch
from scratch_pdl.bench_pdl_kinds import KINDS

index, count = int(sys.argv[1]), int(sys.argv[2])
jobs = [(kind, c, p, m) for m in (1, 8, 64) for kind in [("direct" if m <= 8 else "wgmma")]
        for c in KINDS[kind][1] for p in KINDS[kind][2]]
for kind, c, p, m in jobs[index::count]:
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    qw = torch.randint(0, 255, (64, 2048), device="cuda", dtype=torch.uint8)
    s = torch.rand(64, 32, device="cuda", dtype=torch.bfloat16)
    KINDS[kind][0](x, qw, s, s, None, 128, c, p)
torch.cuda.synchronize()
print("warm", index)
