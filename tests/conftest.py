"""Test-wide set-up: without a CUDA GPU, Triton kernels run under the Triton interpreter.

triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, so it is set here, before any
test module imports llmopt.codegen. `llmopt.capture` remembers its captures for the session (tests/capture_cache.py).
Also: the `shared` fixture (the read-only ../shared folder), the session's
`reference_model`, and the release of cached GPU memory after each `gpu` test.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config):
    from tests import capture_cache

    capture_cache.install()


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found at {SHARED}: tests read the reference model and data from there")
    return SHARED


def pytest_collection_finish(session):
    """Starts the child processes of the selected tests that declare them (tests/background.py)."""
    if session.config.option.collectonly:
        return
    from tests import background

    jobs = []
    for item in session.items:
        declared = getattr(getattr(item, "module", None), "BACKGROUND", {})
        job = declared.get(getattr(item, "originalname", item.name))
        if job is not None and job not in jobs and not item.get_closest_marker("skip"):
            jobs.append(job)
    background.start(jobs)


def pytest_sessionfinish(session):
    from tests import background

    background.stop()


@pytest.fixture(autouse=True)
def _gpu_memory_back_to_the_card(request):
    """After a `gpu` test, its process hands its cached GPU memory back: under `pytest -n 8` eight processes share
    one card, and each one's caching allocator otherwise keeps the peak of its largest model (published widths:
    gigabytes) from the other seven."""
    yield
    if torch.cuda.is_available() and request.node.get_closest_marker("gpu"):
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def reference_model(shared):
    """(model, Program): the reference model (fp32, eval) and its capture, loaded and captured once a session
    (a 6-layer torch.export takes seconds on CPU). Tests must not change either: passes run on `.copy()`."""
    from transformers import AutoModelForCausalLM

    import llmopt

    model = AutoModelForCausalLM.from_pretrained(shared / "models" / "ref-llama-12m", dtype=torch.float32).eval()
    return model, llmopt.capture(model)
