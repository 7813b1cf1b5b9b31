"""`llmopt.compile(model, passes, calibration, backend, debug) -> CompiledModel`.

Capture (torch.export) -> run the passes (PassManager) -> lower for a backend:
- "torch": the Program runs on reference ops (any device);
- "triton": llmopt.codegen lowers the Program to generated Triton kernels (CUDA);
- "auto": "triton" when CUDA and Triton are there and the Program is on CUDA, else "torch".
"""
import torch

from llmopt.calibration import Calibration
from llmopt.compiled import CompiledModel
from llmopt.devices import check_triton_device
from llmopt.errors import LlmoptError
from llmopt.pass_manager import PassManager

BACKENDS = ("auto", "torch", "triton")


def compile(model, passes=(), calibration=None, backend: str = "auto", debug: bool = False, example_inputs=None) -> CompiledModel:
    from llmopt.capture import capture
    from llmopt.program import Program

    if backend not in BACKENDS:
        raise LlmoptError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    calibration = Calibration.coerce(calibration)
    program = model if isinstance(model, Program) else capture(model, example_inputs)
    bytes_before = program.parameter_bytes()
    chosen = _pick_backend(backend, program)  # before the passes: no pass moves the Program, and they may take minutes
    manager = PassManager(passes, debug=debug)
    program = manager.run(program, calibration)
    runner = None
    if chosen == "triton":
        from llmopt.codegen import lower

        runner = lower(program)
    return CompiledModel(program, manager.report, chosen, bytes_before, runner)


def _pick_backend(backend: str, program) -> str:
    cuda_program = program.device.type == "cuda"
    if backend == "auto":
        return "triton" if cuda_program and _has_triton_codegen() else "torch"
    if backend == "triton":
        check_triton_device(program, "backend='triton'")
    return backend


def _has_triton_codegen() -> bool:
    try:
        from llmopt.codegen import lower  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
