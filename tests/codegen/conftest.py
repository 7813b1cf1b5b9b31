"""Runs codegen's Triton kernels under the Triton interpreter where there is no CUDA GPU.

triton reads TRITON_INTERPRET (`triton.knobs.runtime.interpret`) when `@triton.jit` decorates a
kernel, so it must be set before any kernel module is imported; pytest imports this file first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
