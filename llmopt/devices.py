"""Devices a user names (`llmopt.load(..., device=)`, `Program.to`, the CLI's `--device`), checked before anything
moves.

Entry points: `checked_device(device, who) -> torch.device`: an `LlmoptError` that names the fix when this machine
has no such device, instead of torch's error from deep inside a copy (a pinned-memory RuntimeError, an
AssertionError "Torch not compiled with CUDA enabled"); `check_triton_device(program, who)`: the same for running a
Program on Triton kernels, which need it on a CUDA GPU unless the Triton interpreter is on.
"""
import os

import torch

from llmopt.errors import LlmoptError


def checked_device(device, who: str) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise LlmoptError(f"{who}: {device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LlmoptError(f"{who}: device {str(device)!r} asked for, but this machine has no CUDA GPU that torch "
                              f"can use (torch {torch.__version__}); use device='cpu', or a CUDA build of torch on a "
                              "GPU machine")
        if device.index is not None and device.index >= count:
            raise LlmoptError(f"{who}: device {str(device)!r} asked for, but this machine has {count} CUDA GPU(s) "
                              f"(cuda:0 to cuda:{count - 1})")
    if device.type == "meta":
        raise LlmoptError(f"{who}: the meta device holds no weights; use 'cpu' or 'cuda'")
    return device


def triton_interpreter() -> bool:
    """Whether TRITON_INTERPRET asks Triton to run kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_device(program, who: str) -> None:
    if program.device.type != "cuda" and not triton_interpreter():
        raise LlmoptError(
            f"{who} needs the model on a CUDA GPU (it is on {program.device.type}): move it with model.to('cuda') "
            "(or program.to('cuda')) first, use backend='torch', or set TRITON_INTERPRET=1 to run the kernels on the "
            "CPU (slow; for tests)"
        )
