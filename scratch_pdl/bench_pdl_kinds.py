"""Scratch: the kernels bench_pdl times, importable without running it."""
from scratch_pdl import direct_pdl, wgmma_pdl

KINDS = {"direct": (direct_pdl.linear_w4_direct, direct_pdl.CONFIGS, (0, 1, 2, 4)),
         "wgmma": (wgmma_pdl.linear_w4_wgmma, wgmma_pdl.CONFIGS, (0, 1, 4))}
