"""llmopt's Triton kernels (`llmopt.codegen.kernels`), one module per kernel family.

Append-only: each kernel module adds its import line below.
"""
from llmopt.codegen.kernels.flash_attention import flash_attention, flash_attention_varlen  # noqa: F401
from llmopt.codegen.kernels.paged_attention import paged_attention  # noqa: F401
from llmopt.codegen.kernels.rmsnorm import residual_layernorm, residual_rmsnorm  # noqa: F401
