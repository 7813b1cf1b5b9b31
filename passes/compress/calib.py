"""Calibration-sample helpers shared by the compression searches.

Entry points: `calibration_rows(x, k, max_tokens, device, who)` (checks a `[n_tokens, K]` sample and
keeps at most `max_tokens` evenly spaced rows, in fp32 on `device`), `channel_abs_mean` and
`channel_abs_max` (per-channel statistics over every token, in row chunks) and `rows_per_chunk`,
which sizes the output-channel chunks that keep a search's temporaries under `CHUNK_ELEMENTS` floats.
"""
import torch

# floats per search temporary: large on GPUs (256 MiB in fp32); on CPU small enough (4 MiB) for the
# allocator to reuse buffers instead of paging in fresh memory for every temporary
CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 20}


def calibration_rows(x: torch.Tensor, k: int, max_tokens: int, device, who: str) -> torch.Tensor:
    """x: [n, K] (or [..., K]) -> [min(n, max_tokens), K] fp32 on `device`, evenly spaced rows."""
    if x.shape[-1] != k:
        raise ValueError(f"{who}: calibration inputs have {x.shape[-1]} channels, the weights expect K={k}")
    x = x.reshape(-1, k)
    if x.shape[0] == 0:
        raise ValueError(f"{who}: no calibration tokens given")
    if x.shape[0] > max_tokens:
        keep = torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).round().long()
        x = x[keep]
    x = x.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}: calibration inputs contain NaN or Inf; check the calibration run")
    return x


def channel_abs_mean(x: torch.Tensor, k: int, device, rows: int = 4096) -> torch.Tensor:
    """x: [n, K] (or [..., K]) -> mean |x| per channel: [K] fp32 on `device`, without an fp32 copy of x."""
    total = torch.zeros(k, dtype=torch.float64, device=device)
    x = x.reshape(-1, k)
    for chunk in x.split(rows):
        total += chunk.to(device=device, dtype=torch.float32).abs().sum(dim=0).double()
    return (total / max(1, x.shape[0])).float()


def channel_abs_max(x: torch.Tensor, k: int, device, rows: int = 4096) -> torch.Tensor:
    """x: [n, K] (or [..., K]) -> max |x| per channel: [K] fp32 on `device`."""
    best = torch.zeros(k, dtype=torch.float32, device=device)
    for chunk in x.reshape(-1, k).split(rows):
        best = torch.maximum(best, chunk.to(device=device, dtype=torch.float32).abs().amax(dim=0))
    return best


def rows_per_chunk(per_row_elements: int, device) -> int:
    """How many output rows fit in one temporary on `device` when each row costs `per_row_elements` floats."""
    budget = CHUNK_ELEMENTS.get(torch.device(device).type, CHUNK_ELEMENTS["cuda"])
    return max(1, budget // max(1, per_row_elements))
