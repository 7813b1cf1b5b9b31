"""Generated fusion kernels (`llmopt.codegen.fusion`): pointwise chains and row reductions as Triton.

Entry points:
- `partition(graph) -> list[FusionGroup]`: which nodes fuse (`partition.py`).
"""
from llmopt.codegen.fusion.partition import FusionGroup, partition

__all__ = ["FusionGroup", "partition"]
