"""Scratch: variant B (one x ring per block parity) against the reference on the wgmma test's shapes, every config."""
import torch
from tests.codegen.test_w4a16_direct import _inputs, _reference
from scratch_s17 import w4a16_wgmma_b as vb

worst = 0.0
for m, n, k, g, dtype, with_bias in [
        (17, 4096 + 96, 4096, 128, torch.bfloat16, True), (20, 100, 384, 128, torch.float16, False),
        (64, 4100, 11008, 128, torch.bfloat16, False), (37, 77, 1024, 256, torch.bfloat16, True),
        (128, 33, 128, 128, torch.float16, True), (100, 11008, 4096, 512, torch.float16, False),
        (9, 200, 1280, 256, torch.bfloat16, True)]:
    x, qweight, scales, zeros, bias = _inputs(m, n, k, g, dtype, with_bias, seed=m + n)
    ref = _reference(x, qweight, scales, zeros, bias, g)
    for config in vb.CONFIGS + [(1, 2, False), (16, 4, True), (16, 2, False)]:
        y = vb.linear_w4_wgmma(x, qweight, scales, zeros, bias, g, config)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        same = torch.equal(y, vb.linear_w4_wgmma(x, qweight, scales, zeros, bias, g, config))
        ok = err < (4e-3 if dtype == torch.bfloat16 else 1e-3) and same
        worst = max(worst, err)
        if not ok:
            print("FAIL", (m, n, k, g, dtype, with_bias), config, err, same, flush=True)
print("check_b done, worst rel err", worst)
