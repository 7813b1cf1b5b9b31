"""llmopt's custom ops (the `torch.ops.llmopt` namespace).

Each op has a fake (shape) implementation and a plain-PyTorch reference implementation that runs on
any device; the reference is the oracle every Triton kernel is tested against. Codegen swaps these
ops for its kernels when it lowers a Program (`llmopt.codegen.lower`); nothing is registered
globally, so `backend="torch"` always runs the reference.

Ops:
- `torch.ops.llmopt.linear_w8a8`: int8 weight x int8 activation linear (`linear_w8a8.py`)
- `torch.ops.llmopt.linear_wq`: weight-only group-quantized linear, 3/4/8 bits (`linear_wq.py`)
- `torch.ops.llmopt.attention`: causal attention with GQA, no K/V repeat (`attention.py`)
- `torch.ops.llmopt.paged_attention`: decode attention over a paged KV cache (`paged_attention.py`)
"""
from llmopt.ops import attention, linear_w8a8, linear_wq, paged_attention  # noqa: F401  (registers the ops)
from llmopt.ops.linear_w8a8 import quantize_per_token
from llmopt.ops.linear_wq import pack_int4, unpack_int4, dequantize_groups

__all__ = ["quantize_per_token", "pack_int4", "unpack_int4", "dequantize_groups"]
