"""llmopt's Triton kernels (`llmopt.codegen.kernels`), one module per kernel family.

Append-only: each kernel module adds its import line below.
"""
from llmopt.codegen.kernels.flash_attention import flash_attention, flash_attention_varlen  # noqa: F401
from llmopt.codegen.kernels.paged_attention import paged_attention  # noqa: F401
from llmopt.codegen.kernels.rmsnorm import residual_layernorm, residual_rmsnorm  # noqa: F401
from llmopt.codegen.kernels.quantize_rows import quantize_rows  # noqa: F401
from llmopt.codegen.kernels.w8a8_gemm import linear_w8a8  # noqa: F401
from llmopt.codegen.kernels.w4a16_gemm import linear_wq  # noqa: F401
