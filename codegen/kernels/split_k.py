"""Split-K kernels whose last program to arrive sums the partials (one launch a call).

Entry points:
- `arrival_counters(device, n_tiles) -> int32 tensor`, at least n_tiles long and all zero between launches: each
  output tile's programs add 1 to its counter, and the one that reads SPLIT_K - 1 sums the partials and sets it back
  to 0. `w4a16_gemm.py`, `w4a16_wgmma.py` and `w8a8_gemm.py` share one buffer a device (launches on one stream do
  not overlap); `tile_counters(device, m, n)`: enough of them for an [m, n] output in the smallest tiles;
- `sum_of_splits`, in a Triton kernel: the publish, count and sum, for the Triton kernels (`w4a16_wgmma.py`'s
  Gluon kernel writes its own).
"""
import torch
import triton
import triton.language as tl

_counters = {}  # device -> int32 counters
MIN_TILE = 16  # the smallest BLOCK_M and BLOCK_N of the Triton split-K kernels: sizes `tile_counters`


def arrival_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    buf = _counters.get(device)
    if buf is None or buf.numel() < n_tiles:
        buf = torch.zeros(max(n_tiles, 1024), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def tile_counters(device: torch.device, m: int, n: int) -> torch.Tensor:
    """`arrival_counters` enough for an [m, n] output cut into tiles of at least MIN_TILE x MIN_TILE."""
    return arrival_counters(device, triton.cdiv(m, MIN_TILE) * triton.cdiv(n, MIN_TILE))


@triton.jit
def sum_of_splits(acc, ws_tile, split, M, N, count_ptr, tile, mask, SPLIT_K: tl.constexpr):
    """acc: this program's partial sum of output tile `tile`; ws_tile: the tile's pointers into ws [SPLIT_K, M, N] at
    split 0 -> (whether this program is the tile's last to arrive, the sum of every split's partial: valid in that
    program only). Publishes acc at its split, counts the arrival; the last sums the partials, all loads at once,
    and zeroes the counter for the next call."""
    tl.store(ws_tile + split * M * N, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    total = tl.zeros_like(acc)
    if arrived == SPLIT_K - 1:
        for sk in tl.static_range(SPLIT_K):  # unrolled, so every partial's load is in flight at once
            total += tl.load(ws_tile + sk * M * N, mask=mask, other=0, cache_modifier=".cg")
        tl.atomic_xchg(count_ptr + tile, 0)
    return arrived == SPLIT_K - 1, total
