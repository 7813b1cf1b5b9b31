"""Scratch: compile the PDL direct kernel's configs and modes in parallel (INDEX COUNT)."""
import sys
import torch
from scratch_pdl import direct_pdl as D

index, count = int(sys.argv[1]), int(sys.argv[2])
jobs = [(c, p, m) for c in D.CONFIGS for p in (0, 1, 2, 3) for m in (1, 8)]
for c, p, m in jobs[index::count]:
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    qw = torch.randint(0, 255, (64, 2048), device="cuda", dtype=torch.uint8)
    s = torch.rand(64, 32, device="cuda", dtype=torch.bfloat16)
    D.linear_w4_direct(x, qw, s, s, None, 128, c, p)
torch.cuda.synchronize()
print("warm", index)
