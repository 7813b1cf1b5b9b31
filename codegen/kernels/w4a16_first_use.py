"""What llmopt's two Gluon W4A16 kernels (`w4a16_direct.py`, `w4a16_wgmma.py`) share around their launch: which calls
they take, their one-time check against the reference, and their per-shape choice of config, kept on disk.

Entry point: `first_use_config(x, qweight, group_size, bits, rows, checked, tuned, check, tune) -> config | None`,
each kernel's `choose`: None for a call the kernel does not take (another GPU than sm_90, another dtype or width, M
outside `rows`, misaligned operands), for a kernel that failed its check, and during CUDA-graph capture before the
check has run in this process or the tuning in this or an earlier one (neither can run inside a capture). Each kernel
keeps its choices in `choices_on_disk(kernel_file, choices)` (`choice_cache.py`). The helpers `check` and `tune` are
built from:
`matches_reference` (a small odd case against the reference op, through `first_use_check`) and `fastest_streaming`
(every config timed on weights streamed from memory, `tuning.streaming_bench`).
"""
from pathlib import Path

import torch
import triton

from llmopt.codegen.kernels import tuning
from llmopt.codegen.kernels.choice_cache import MISSING, ChoiceCache
from llmopt.codegen.kernels.first_use_check import passes_first_use_check

TILE_K = 128  # k a block in both kernels: 64 bytes a row, one group at G >= 128
DTYPES = (torch.bfloat16, torch.float16)


def first_use_config(x: torch.Tensor, qweight: torch.Tensor, group_size: int, bits: int, rows: range,
                     checked: dict, tuned: dict, check, tune):
    """x: [M, K] contiguous, qweight: [N, K // 2] contiguous. checked: (device index, dtype) -> bool, filled by
    check(device, dtype) once a process each; tuned: a `ChoiceCache` of (dtype, M bucket, N, K, G) ->
    config, filled by tune(x, n, k, group_size) once each (the M bucket: the next power of two) and kept on disk, so a
    new process on the same GPU and software reuses it."""
    m, k = x.shape
    if not (x.is_cuda and x.dtype in DTYPES and bits in (3, 4) and group_size >= TILE_K
            and group_size & (group_size - 1) == 0 and k % group_size == 0 and m in rows
            and x.data_ptr() % 16 == 0 and qweight.data_ptr() % 16 == 0
            and torch.cuda.get_device_capability(x.device) == (9, 0)):
        return None
    capturing = torch.cuda.is_current_stream_capturing()
    check_key = (x.device.index, x.dtype)
    if check_key not in checked:
        if capturing:
            return None
        checked[check_key] = check(x.device, x.dtype)
    if not checked[check_key]:
        return None
    n = qweight.shape[0]
    tune_key = (x.dtype, triton.next_power_of_2(m), n, k, group_size)
    choice = tuned.get(tune_key, x.device)  # a file read at most: allowed during a capture
    if choice is MISSING:
        if capturing:
            return None
        choice = tuned.put(tune_key, x.device, tune(x, n, k, group_size))
    return choice


def choices_on_disk(kernel_file: str, choices: list) -> ChoiceCache:
    """The `ChoiceCache` of the kernel in kernel_file, whose tuning can pick any of choices: keyed by that file, this
    one and `tuning.py` (how the configs are timed)."""
    return ChoiceCache(Path(kernel_file).stem, [kernel_file, __file__, tuning.__file__], choices)


def random_w4(n: int, k: int, group_size: int, dtype: torch.dtype, device: torch.device, generator=None) -> tuple:
    """Random 4-bit weights as the kernels take them: qweight [N, K // 2] uint8, scales and zeros [N, K // G]."""
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=generator)
    scales = (torch.rand(n, k // group_size, device=device, generator=generator) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (n, k // group_size), device=device, generator=generator).to(dtype)
    return qweight, scales, zeros


def fastest_streaming(linear, configs: list, x: torch.Tensor, n: int, k: int, group_size: int):
    """linear(x, qweight, scales, zeros, bias, group_size, config) -> the fastest of configs for x against random
    [n, k] weights, streamed from memory (`tuning.streaming_bench`: timing calls on one copy, which L2 holds, picked
    configs up to 1.2x slower than the best on the H100; timing them launched from Python, up to 1.14x slower)."""
    x = torch.randn_like(x)
    weights = []

    def make_call(i, cfg):
        while len(weights) <= i:
            weights.append(random_w4(n, k, group_size, x.dtype, x.device))
        return lambda: linear(x, *weights[i], None, group_size, cfg)

    weight_bytes = n * k // 2 + 4 * n * (k // group_size)
    times = {cfg: tuning.streaming_bench(lambda i, cfg=cfg: make_call(i, cfg), weight_bytes, x.device)
             for cfg in configs}
    return min(times, key=times.get)


def matches_reference(linear, label: str, fallback: str, m: int, n: int, k: int, group_size: int,
                      device: torch.device, dtype: torch.dtype) -> bool:
    """Runs linear(x, qweight, scales, zeros, bias, group_size) on a small odd case (m rows of x, bias) against the
    reference; a failure to compile or a relative error of 1e-2 or more (bf16 rounding of the output is ~2e-3)
    warns, naming label and fallback, at the caller of `linear_wq`."""
    from llmopt.ops.linear_wq import dequantize_groups

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
    qweight, scales, zeros = random_w4(n, k, group_size, dtype, device, gen)
    bias = torch.randn(n, device=device, dtype=dtype, generator=gen)
    ref = x.float() @ dequantize_groups(qweight, scales, zeros, group_size, 4).float().t() + bias.float()
    where = f"on this GPU and Triton {triton.__version__} ({dtype})"
    # frames above passes_first_use_check's: this, the kernel's check, first_use_config, choose, linear_wq
    return passes_first_use_check(label, where, lambda: linear(x, qweight, scales, zeros, bias, group_size), ref,
                                  1e-2, "reference", fallback, stacklevel=6)
