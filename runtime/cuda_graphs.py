"""Replay repeated calls from CUDA graphs, where that is faster.

Entry point: `GraphCache(fn, max_entries=4)`, a callable with the signature of `fn(*args)` (tensors
or None; `fn` returns one tensor). The lowered programs of `llmopt.codegen.lower` call through one.

A generated model is many small Triton launches, and Python's launch cost can leave the GPU idle
between them (a SmoothQuant prefill of a Llama-2-7B shape in `benchmarks/e2e.py`: 10.0 ms launched
from Python, 8.5 ms replayed from a graph).
A CUDA graph replays all launches at once. Per key (shape, dtype and device of each argument):
1. the first call runs `fn` eagerly (it also autotunes the kernels of that shape);
2. the second captures `fn` into a graph over static copies of the inputs, then times a few eager
   calls against a few replays (CUDA events) and keeps the faster: a library kernel can pick a
   slower algorithm under capture, so the graph is not always the winner;
3. later calls copy their inputs into the static buffers and replay, returning a copy of the
   graph's output (the buffer itself is overwritten by the next replay).
Keys seen once never capture, so generation (a new length every step) stays eager; at most
`max_entries` graphs are kept (least recently used dropped with their memory pools). A capture that
fails (an op that synchronizes, say) raises `GraphCaptureError` naming the fix (turn graphs off):
torch leaves the CUDA random generator unusable after an aborted capture, so carrying on eagerly
would only move the failure somewhere else. llmopt's lowered graphs hold no synchronizing op.
Off the GPU, and while a graph is being captured elsewhere, it calls `fn`.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from llmopt.errors import LlmoptError

TIMING_RUNS = 3


class GraphCaptureError(LlmoptError):
    """A CUDA graph capture failed; the process's CUDA state may not be usable afterwards."""


@dataclass
class _Entry:
    calls: int = 0
    graph: Optional[torch.cuda.CUDAGraph] = None  # None: eager (not captured yet, or eager was faster)
    inputs: tuple = ()  # the graph's static input buffers
    output: Optional[torch.Tensor] = None  # the graph's static output
    eager_ms: float = float("nan")
    graph_ms: float = float("nan")


class GraphCache:
    """`fn` with its repeated calls replayed from CUDA graphs; see the module docstring."""

    def __init__(self, fn: Callable, max_entries: int = 4):
        self.fn = fn
        self.max_entries = max_entries
        self.entries = OrderedDict()  # key -> _Entry, least recently used first

    def __call__(self, *args):
        tensors = [a for a in args if a is not None]
        if not tensors or not tensors[0].is_cuda or torch.cuda.is_current_stream_capturing():
            return self.fn(*args)
        key = tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)
        entry = self.entries.pop(key, None) or _Entry()
        self.entries[key] = entry  # most recently used last
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        entry.calls += 1
        if entry.graph is not None:
            for buffer, a in zip(entry.inputs, args):
                if buffer is not None:
                    buffer.copy_(a)
            entry.graph.replay()
            return entry.output.clone()
        if entry.calls == 2:
            self._capture(entry, args)
        return self.fn(*args)

    def summary(self) -> list:
        """One line a key: its shapes, and graph or eager with the timings that decided it."""
        lines = []
        for key, e in self.entries.items():
            shapes = ", ".join("None" if k is None else "x".join(map(str, k[0])) for k in key)
            how = "graph" if e.graph is not None else "eager"
            lines.append(f"({shapes}): {how} (eager {e.eager_ms:.3f} ms, graph {e.graph_ms:.3f} ms, {e.calls} calls)")
        return lines

    def _capture(self, entry: _Entry, args) -> None:
        inputs = tuple(None if a is None else a.clone() for a in args)
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
                self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                output = self.fn(*inputs)
        except Exception as err:
            raise GraphCaptureError(
                f"capturing a CUDA graph of this call (argument shapes {[None if a is None else tuple(a.shape) for a in args]}) "
                f"failed: {type(err).__name__}: {str(err)[:200]}. Something in the model synchronizes with the CPU; "
                "lower it with cuda_graphs=False (llmopt.codegen.lower(program, cuda_graphs=False)) and restart the process"
            ) from err
        entry.eager_ms = _time_ms(lambda: self.fn(*inputs))
        entry.graph_ms = _time_ms(graph.replay)
        if entry.graph_ms < entry.eager_ms:
            entry.graph, entry.inputs, entry.output = graph, inputs, output


def _time_ms(fn) -> float:
    """Median of TIMING_RUNS calls, in milliseconds, by CUDA events."""
    times = []
    for _ in range(TIMING_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
