"""Compiling a Gluon kernel for sm_90 on any machine, specialized as Triton's launcher would for contiguous tensors.

Entry points: `compile_gluon_for_sm90(kernel, types, constants, aligned, **options) -> the compiled kernel` (its
`asm["ptx"]`, `metadata.shared`, ...), `compile_triton_for_sm90(...)`, the same for a `@triton.jit` kernel, and
`compile_job(script) -> Job`, the child process a compile test runs its script in (this suite runs Triton's
interpreter, which does not compile; `tests/background.py` starts the job when the tests are collected).
"""
import sys
from pathlib import Path

from tests.background import Job

REPO = Path(__file__).resolve().parents[2]


def compile_job(script: str) -> Job:
    """script (Python source, run from the repository root with the interpreter off) as a background job."""
    return Job([sys.executable, "-c", script], env_update={"TRITON_INTERPRET": "0"}, timeout=600, cwd=REPO)


def compile_gluon_for_sm90(kernel, types: dict, constants: dict, aligned: tuple, **options):
    """kernel's arguments are i32 unless `types` names theirs ("*bf16", "tensordesc<...>", ...); `constants` the
    constexpr ones; those named in `aligned` are 16-byte aligned (pointers and row strides of contiguous tensors)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    return _compile_for_sm90(GluonASTSource, kernel, types, constants, aligned, **options)


def compile_triton_for_sm90(kernel, types: dict, constants: dict, aligned: tuple, **options):
    """As `compile_gluon_for_sm90`, for a `@triton.jit` kernel."""
    from triton.compiler import ASTSource

    return _compile_for_sm90(ASTSource, kernel, types, constants, aligned, **options)


def _compile_for_sm90(source_type, kernel, types: dict, constants: dict, aligned: tuple, **options):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    signature = {name: "i32" for name in kernel.arg_names}
    signature.update(types)
    signature.update({name: "constexpr" for name in constants})
    hints = {(kernel.arg_names.index(name), ): [["tt.divisibility", 16]] for name in aligned}
    return triton_compile(source_type(kernel, signature, constants, hints), target=GPUTarget("cuda", 90, 32),
                          options=options)
