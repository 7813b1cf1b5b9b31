"""llmopt's passes. Each is a `llmopt.Pass`; run them through `llmopt.compile(model, passes=[...])`.

Exact: `MergeLoRA`, `Smooth`, `DeadCodeElimination`, `ConstantFolding`.
"""
from llmopt.passes.cleanup import ConstantFolding, DeadCodeElimination
from llmopt.passes.merge_lora import MergeLoRA
from llmopt.passes.smooth import Smooth

__all__ = ["ConstantFolding", "DeadCodeElimination", "MergeLoRA", "Smooth"]
from llmopt.passes.fuse_attention import FuseAttention  # noqa: E402

__all__ += ["FuseAttention"]
from llmopt.passes.awq import AWQ  # noqa: E402
from llmopt.passes.merge_lora_quantized import MergeLoRAQuantized  # noqa: E402
from llmopt.passes.prune import MagnitudePrune, Wanda  # noqa: E402
from llmopt.passes.rtn import RTN  # noqa: E402
from llmopt.passes.w8a8 import W8A8, SmoothQuant  # noqa: E402

__all__ += ["AWQ", "MagnitudePrune", "MergeLoRAQuantized", "RTN", "SmoothQuant", "W8A8", "Wanda"]
