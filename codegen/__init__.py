"""llmopt's code generator: Programs lowered to Triton kernels for NVIDIA GPUs.

Entry points: `lower(program) -> LoweredProgram` (`llmopt.compile(..., backend="triton")` calls it);
`dump_kernels(program, directory)` writes the generated kernels lowering makes (`llmopt compile --dump-kernels`).
Kernels live in `llmopt.codegen.kernels` (templates) and `llmopt.codegen.fusion` (generated).
"""
from llmopt.codegen.lower import LoweredProgram, dump_kernels, lower

__all__ = ["LoweredProgram", "dump_kernels", "lower"]
