"""Programmatic dependent launch (PDL): when llmopt's kernels launch with it, and the contract they keep.

Entry points: `launch_options(device) -> dict`, the keyword arguments a Triton kernel with a `PDL: tl.constexpr`
parameter is launched with (`PDL` and, where it is on, Triton's `launch_pdl`); `use_pdl(device) -> bool`;
`enabled() -> bool`. The Gluon kernels' instructions are in `pdl_gluon.py`.

A decode step is a chain of kernels of a few microseconds each, and each pays a fixed cost to start: the launch,
and the first loads' latency before any byte streams. Launched with PDL
(`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`), a kernel may start while the one before it in the stream
still runs, once every program of that one has executed `griddepcontrol.launch_dependents` (or exited);
`griddepcontrol.wait` then blocks until that kernel has finished and its writes are visible. The contract every
llmopt kernel with a `PDL` switch keeps: it calls `launch_dependents` first (so the next kernel's programs take the
SMs' free slots while this one runs), stores nothing before `wait`, and loads nothing before it but a model's
constants (weights, their scales and zero points), which no kernel that can run ahead of it writes: weights are
written when a model is built, compressed or loaded, by torch and library calls that launch without PDL and so
finish before anything after them starts. Since each kernel waits for the one before it to finish, and that one
waited for its own predecessor, a kernel that starts early never sees a write still in flight, however long the
chain. A kernel launched without the attribute (a library kernel, say) waits for the whole stream as always, and
one launched after a kernel that never triggers gains nothing but loses nothing: both instructions are then no-ops.
CUDA graphs keep the programmatic edges.

Who launches with it, from the H100 measurements in benchmarks/RESULTS.md (sessions 21-22): the generated fusion
kernels (norms, RoPE, SiLU·mul: each lets the linear after it start early) and the W4A16 decode kernel, which
loads its first weight blocks before the wait (session 22: a stream of M = 1 calls 1.09-1.17x faster; a one-token
step of a Llama-2-7B shape at batch 1, 1.14x; session 21, waiting before the weights too: 1.10x). Not the wgmma
W4A16 kernel (M = 17-128) or the Triton one (M = 9-16): with PDL a stream of their calls ran 0.89-1.00x and 0.79-1.03x
(why was not profiled).

PDL exists on sm_90 and later; it is off under the Triton interpreter and when `LLMOPT_PDL=0` is set (the
benchmarks time both).
"""
import functools
import os

import torch
import triton


def enabled() -> bool:
    """Whether kernels launch with PDL where the GPU has it (`LLMOPT_PDL=0` turns it off)."""
    return os.environ.get("LLMOPT_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def use_pdl(device: torch.device) -> bool:
    """Whether a Triton kernel on `device` launches with PDL: sm_90 or later, not interpreted, `enabled()`."""
    if device.type != "cuda" or triton.knobs.runtime.interpret or not enabled():
        return False
    return _has_pdl(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict:
    """`PDL` for the kernel's constexpr switch, and Triton's `launch_pdl` where it is on."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(device) else {"PDL": False}
