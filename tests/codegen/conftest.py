"""Runs codegen's Triton kernels under the Triton interpreter where there is no CUDA GPU.

triton reads TRITON_INTERPRET (`triton.knobs.runtime.interpret`) when `@triton.jit` decorates a
kernel, so it must be set before any kernel module is imported; pytest imports this file first.
Fixture: `poison` (outputs start as NaN).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poison(monkeypatch):
    """Fills every tensor made by torch.empty/empty_like with NaN (integers: their minimum), so an
    output element a kernel forgets to write fails the test instead of passing on leftover memory."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(torch.iinfo(t.dtype).min) if t.dtype != torch.bool else t

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: fill(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: fill(empty_like(*args, **kwargs)))
