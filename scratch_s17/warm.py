"""Scratch: compile every config of the three wgmma kernels at the bench's specializations, in parallel processes
(python -m scratch_s17.warm INDEX COUNT), so the bench itself reads Triton's cache."""
import itertools, sys
import torch
from llmopt.codegen.kernels import w4a16_wgmma as new
from scratch_s17 import w4a16_wgmma_old as old, w4a16_wgmma_b as b, w4a16_wgmma_c as c

index, count = int(sys.argv[1]), int(sys.argv[2])
jobs = [(mod, cfg, m, k) for mod in (new, b, c, old) for cfg in mod.CONFIGS for m in (16, 32, 64, 128) for k in (4096, 11008)]
for mod, cfg, m, k in jobs[index::count]:
    n = 64
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qw = torch.randint(0, 255, (n, k // 2), device="cuda", dtype=torch.uint8)
    s = torch.rand(n, k // 128, device="cuda", dtype=torch.bfloat16)
    mod.linear_w4_wgmma(x, qw, s, s, None, 128, cfg)
torch.cuda.synchronize()
print("warm", index, len(jobs[index::count]))
