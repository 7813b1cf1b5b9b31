"""Scratch: variants B (one x ring per block parity) and C (four slots, one CTA barrier a block) against the reference on the wgmma test's shapes, every config."""
import sys
import torch
from tests.codegen.test_w4a16_direct import _inputs, _reference
from scratch_s17 import w4a16_wgmma_b, w4a16_wgmma_c

index, count = int(sys.argv[1]), int(sys.argv[2])
worst = 0.0
SHAPES = [
        (17, 4096 + 96, 4096, 128, torch.bfloat16, True), (20, 100, 384, 128, torch.float16, False),
        (64, 4100, 11008, 128, torch.bfloat16, False), (37, 77, 1024, 256, torch.bfloat16, True),
        (128, 33, 128, 128, torch.float16, True), (100, 11008, 4096, 512, torch.float16, False),
        (9, 200, 1280, 256, torch.bfloat16, True)]
EXTRA = [(1, 4, False), (16, 4, True), (4, 4, True), (2, 2, False)]
jobs = [(shape, v, c) for shape in SHAPES for v in (w4a16_wgmma_b, w4a16_wgmma_c) for c in EXTRA if c in v.CONFIGS or c[0] in (1, 16)]
for (m, n, k, g, dtype, with_bias), vb, config in jobs[index::count]:
    x, qweight, scales, zeros, bias = _inputs(m, n, k, g, dtype, with_bias, seed=m + n)
    ref = _reference(x, qweight, scales, zeros, bias, g)
    y = vb.linear_w4_wgmma(x, qweight, scales, zeros, bias, g, config)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    same = torch.equal(y, vb.linear_w4_wgmma(x, qweight, scales, zeros, bias, g, config))
    ok = err < (4e-3 if dtype == torch.bfloat16 else 1e-3) and same
    worst = max(worst, err)
    if not ok:
        print("FAIL", vb.__name__, (m, n, k, g, dtype, with_bias), config, err, same, flush=True)
print("check_b/c", index, "done:", len(jobs[index::count]), "runs, worst rel err", worst)
