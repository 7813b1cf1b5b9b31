"""llmopt's passes. Each is a `llmopt.Pass`; run them through `llmopt.compile(model, passes=[...])`.

Exact: `MergeLoRA`, `Smooth`, `DeadCodeElimination`, `ConstantFolding`.
"""
from llmopt.passes.cleanup import ConstantFolding, DeadCodeElimination
from llmopt.passes.merge_lora import MergeLoRA
from llmopt.passes.smooth import Smooth

__all__ = ["ConstantFolding", "DeadCodeElimination", "MergeLoRA", "Smooth"]
from llmopt.passes.fuse_attention import FuseAttention  # noqa: E402

__all__ += ["FuseAttention"]
