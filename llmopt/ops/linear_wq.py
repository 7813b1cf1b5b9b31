"""`torch.ops.llmopt.linear_wq`: weight-only group-quantized linear (W3/W4/W8, A16/A32).

Storage (the canonical layout every pass writes and every kernel reads):
- `qweight`: uint8. bits <= 4: `[N, K // 2]`, two values per byte, element k in the low nibble of
  byte k // 2 when k is even, the high nibble when odd. bits == 8: `[N, K]`.
- `scales`: `[N, K // group_size]` float (the activation dtype).
- `zeros`: `[N, K // group_size]` float holding the integer zero point of each group.
Dequantized weight: `W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]`.
"""
from typing import Optional

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: [N, K] integer values in [0, 15], K even -> [N, K // 2] uint8."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed: [N, K // 2] uint8 -> [N, K] uint8 in [0, 15]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def dequantize_groups(qweight, scales, zeros, group_size: int, bits: int) -> torch.Tensor:
    """-> W: [N, K] in the dtype of `scales`."""
    q = unpack_int4(qweight) if bits <= 4 else qweight
    n, k = q.shape
    qg = q.reshape(n, k // group_size, group_size).to(scales.dtype)
    w = (qg - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)
    return w.reshape(n, k)


@torch.library.custom_op("llmopt::linear_wq", mutates_args=())
def linear_wq(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K // 2] or [N, K] uint8
    scales: torch.Tensor,  # [N, K // G]
    zeros: torch.Tensor,  # [N, K // G]
    bias: Optional[torch.Tensor],  # [N] or None
    group_size: int,
    bits: int,
) -> torch.Tensor:
    w = dequantize_groups(qweight, scales, zeros, group_size, bits).to(x.dtype)  # [N, K]
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@linear_wq.register_fake
def _(x, qweight, scales, zeros, bias, group_size, bits):
    return x.new_empty(*x.shape[:-1], scales.shape[0])
