"""Generated fusion kernels (`llmopt.codegen.fusion`): pointwise chains and row reductions as Triton.

Entry points:
- `partition(graph) -> list[FusionGroup]`: which nodes fuse (`partition.py`);
- `emit(group) -> KernelSource`: a group's Triton kernel and launcher as readable source (`emit.py`);
- `fuse(program) -> FusedProgram` and `fuse_graph_module(gm) -> GraphModule`: the graph with one
  launcher call a group, still runnable (`lower.py`);
- `dump_kernels(program, directory) -> list[Path]`: one `.py` file a kernel.
"""
from llmopt.codegen.fusion.emit import KernelSource, emit
from llmopt.codegen.fusion.lower import FusedProgram, dump_kernels, fuse, fuse_graph_module
from llmopt.codegen.fusion.partition import FusionGroup, partition

__all__ = ["FusedProgram", "FusionGroup", "KernelSource", "dump_kernels", "emit", "fuse", "fuse_graph_module", "partition"]
