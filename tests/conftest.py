"""Test-wide set-up: without a CUDA GPU, Triton kernels run under the Triton interpreter.

triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, so it is set here, before any
test module imports llmopt.codegen. Also: the `shared` fixture (the read-only ../shared folder).
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found at {SHARED}: tests read the reference model and data from there")
    return SHARED
