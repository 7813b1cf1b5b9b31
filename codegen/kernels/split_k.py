"""The arrival counters of split-K kernels whose last program to arrive sums the partials (one launch a call).

Entry point: `arrival_counters(device, n_tiles) -> int32 tensor`, at least n_tiles long and all zero between
launches: each output tile's programs add 1 to its counter, and the one that reads SPLIT_K - 1 sums the fp32 partials
and sets it back to 0. `w4a16_gemm.py` and `w4a16_wgmma.py` share one buffer a device (launches on one stream do
not overlap).
"""
import torch

_counters = {}  # device -> int32 counters


def arrival_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    buf = _counters.get(device)
    if buf is None or buf.numel() < n_tiles:
        buf = torch.zeros(max(n_tiles, 1024), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf
