"""Programmatic dependent launch's two instructions for the Gluon kernels (the contract is in `pdl.py`).

Entry points: `launch_dependents(dummy)` and `wait_for_previous(dummy)`, Gluon functions a kernel calls (dummy: any
small distributed tensor, whose values are ignored).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _grid_dependency_control(dummy, instruction: gl.constexpr):
    gl.inline_asm_elementwise(instruction + " mov.b32 $0, $1;", "=r,r", [dummy], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def launch_dependents(dummy):
    """Let the next kernel in the stream start its programs now (where it was launched with PDL)."""
    _grid_dependency_control(dummy, "griddepcontrol.launch_dependents;")


@gluon.jit
def wait_for_previous(dummy):
    """Block until the previous kernel in the stream has finished and its writes are visible."""
    _grid_dependency_control(dummy, "griddepcontrol.wait;")
