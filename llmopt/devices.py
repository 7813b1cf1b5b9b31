"""Devices a user names (`llmopt.load(..., device=)`, `Program.to`, the CLI's `--device`), checked before anything moves.

Entry point: `checked_device(device, who) -> torch.device`: an `LlmoptError` that names the fix when this machine
has no such device, instead of torch's error from deep inside a copy (a pinned-memory RuntimeError, an
AssertionError "Torch not compiled with CUDA enabled").
"""
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
                              f"can use (torch {torch.__version__}); use device='cpu', or a CUDA build of torch on a GPU machine")
        if device.index is not None and device.index >= count:
            raise LlmoptError(f"{who}: device {str(device)!r} asked for, but this machine has {count} CUDA GPU(s) "
                              f"(cuda:0 to cuda:{count - 1})")
    if device.type == "meta":
        raise LlmoptError(f"{who}: the meta device holds no weights; use 'cpu' or 'cuda'")
    return device
