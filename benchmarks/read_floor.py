"""The time a kernel takes only to read a weight's bytes: the floor for a memory-bound GEMV.

Entry point: `read_floor_ms(n_bytes, copies) -> ms`. A Triton kernel reads C buffers of
`n_bytes` (one launch each, C copies so every launch reads HBM, as bench_gemm's "stream" timing
does) and folds them into one int32 a program; no arithmetic worth the name, no output traffic. The
best of 20 launch shapes (programs per SM × block × warps) is returned: a measured reference for
what reading those bytes once costs when timed the same way (not a proven lower bound), against
which a W4A16 GEMV's time is read (the "% of read floor" column).

`pdl` launches it with programmatic dependent launch (`codegen/kernels/pdl.py`): "wait" waits for the previous
launch before its first load, as a kernel that reads only its input would; "early" reads everything first and
waits only before its store, as a kernel whose every load is a weight could: the floor a GEMV approaches as more of
its weight bytes are asked for before the wait.
"""
import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from benchmarks.common import time_graph_ms

_SHAPES = [(p, b, w) for p in (1, 2, 4, 8, 16) for b, w in ((1024, 4), (2048, 4), (4096, 8), (8192, 8))]


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _read_kernel(src, out, n_words, words_per_program, BLOCK: tl.constexpr, PDL: tl.constexpr,
                 READ_EARLY: tl.constexpr):
    """src: [n_words] int32; out[program] = xor of its run of words (so the loads are not dead)."""
    if PDL:
        gdc_launch_dependents()
        if not READ_EARLY:
            gdc_wait()
    pid = tl.program_id(0)
    start = pid * words_per_program
    acc = tl.zeros([BLOCK], tl.int32)
    for off in range(start, min(start + words_per_program, n_words), BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc ^= tl.load(src + idx, mask=idx < n_words, other=0)
    if PDL and READ_EARLY:
        gdc_wait()
    tl.store(out + pid, tl.reduce(acc, 0, _xor))


@functools.lru_cache  # one measurement per size: the M rows of a shape share it
def read_floor_ms(n_bytes: int, copies: int, pdl: str = "off") -> float:
    """ms per read of n_bytes, the fastest of the launch shapes; pdl: "off", "wait" or "early" (module docstring)."""
    if pdl not in ("off", "wait", "early"):
        raise ValueError(f"pdl={pdl!r}: choose 'off', 'wait' or 'early'")
    n_words = n_bytes // 4
    srcs = [torch.randint(0, 1 << 30, (n_words,), dtype=torch.int32, device="cuda") for _ in range(copies)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(sms * max(p for p, _, _ in _SHAPES), dtype=torch.int32, device="cuda")
    times = []
    for per_sm, block, warps in _SHAPES:
        per_program = triton.cdiv(triton.cdiv(n_words, sms * per_sm), block) * block
        grid = (triton.cdiv(n_words, per_program),)
        times.append(time_graph_ms([
            lambda s=s: _read_kernel[grid](s, out, n_words, per_program, BLOCK=block, PDL=pdl != "off",
                                           READ_EARLY=pdl == "early", num_warps=warps, launch_pdl=pdl != "off")
            for s in srcs
        ]))
    return min(times)
