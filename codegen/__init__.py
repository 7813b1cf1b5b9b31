"""llmopt's code generator: Programs lowered to Triton kernels for NVIDIA GPUs.

Entry point: `lower(program) -> LoweredProgram` (`llmopt.compile(..., backend="triton")` calls it).
Kernels live in `llmopt.codegen.kernels` (templates) and `llmopt.codegen.fusion` (generated).
"""
from llmopt.codegen.lower import LoweredProgram, lower

__all__ = ["LoweredProgram", "lower"]
