"""Programmatic dependent launch (PDL) for the Gluon decode kernels on Hopper.

Entry points: `launch_dependents(dummy)` and `wait_for_previous(dummy)`, Gluon functions a kernel calls (dummy: any
small distributed tensor, whose values are ignored), and `enabled() -> bool`, whether to launch with the attribute.

A decode step is a chain of kernels of a few microseconds each, and each pays a fixed cost to start: the launch,
and the first loads' latency before any byte streams. Launched with `launch_pdl=True`
(`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`), a kernel may start while the one before it in the stream
still runs, once every program of that one has executed `griddepcontrol.launch_dependents` (or exited);
`griddepcontrol.wait` then blocks until that kernel has finished and its writes are visible. The contract a kernel
keeps: nothing it reads that an earlier kernel may write, and nothing it writes, is touched before the wait. The
W4A16 kernels call `launch_dependents` first (so the next kernel's programs take the SMs' free slots while this one
streams) and `wait_for_previous` before any load. A kernel launched without the attribute, or after one that never
calls `launch_dependents`, runs as before: both instructions are then no-ops. Both are safe in CUDA graphs, which
keep the programmatic edge.

`LLMOPT_PDL=0` in the environment turns it off (the benchmarks time both).
"""
import os

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


def enabled() -> bool:
    """Whether the Gluon decode kernels launch with PDL (they run on sm_90 only, where it exists)."""
    return os.environ.get("LLMOPT_PDL", "1") != "0"


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
