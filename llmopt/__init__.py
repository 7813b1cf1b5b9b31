"""llmopt: a compiler for LLM inference.

    import llmopt
    from llmopt.passes import Smooth, MergeLoRA
    cm = llmopt.compile(model, passes=[MergeLoRA(), Smooth(0.5)], calibration=calib_ids)
    cm.generate(input_ids, max_new_tokens=32)

Public API: `compile`, `capture`, `Program`, `Pass`, `PassResult`, `PassManager`, `Pattern`,
`Calibration`, `CompiledModel`, `save`, `load`, and the errors (`LlmoptError`, `CaptureError`, `PassError`, ...).
"""
from llmopt.calibration import Calibration
from llmopt.capture import capture
from llmopt.compile import compile
from llmopt.compiled import CompiledModel
from llmopt.errors import CaptureError, DeviceMemoryError, EquivalenceError, LlmoptError, PassError, VerifyError
from llmopt.pass_manager import PassManager
from llmopt.passes_api import Pass, PassResult
from llmopt.pattern import Match, Pattern
from llmopt.program import Program
from llmopt.serialize import load, save

__all__ = [
    "Calibration", "CaptureError", "CompiledModel", "DeviceMemoryError", "EquivalenceError", "LlmoptError", "Match",
    "Pass", "PassError", "PassManager", "PassResult", "Pattern", "Program", "VerifyError", "capture", "compile",
    "load", "save",
]
