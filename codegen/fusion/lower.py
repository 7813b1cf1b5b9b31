"""Replace each fusion group of a graph by one call to its generated launcher.

Entry points:
- `fuse(program) -> FusedProgram`: the Program left as it is, a fused copy of its graph that shares
  its weights, runnable like the Program (`fused(input_ids, position_ids=None) -> logits`);
- `fuse_graph_module(gm) -> GraphModule`: the same on any graph module whose nodes carry
  `meta["val"]` (`llmopt.codegen.lower` calls it on its lowered graphs);
- `dump_kernels(program, directory) -> list[Path]`: one `.py` file a kernel, named after its group.

A group becomes `call_function(launcher, inputs)`, named after its output; with several outputs,
`getitem` nodes take the original output nodes' names, so the fused graph reads like the original. Since a group may read a
value defined after a node that uses one of its outputs, the fused graph is rebuilt in a
topological order of the graph with each group contracted to one node (a DAG: groups are convex),
keeping the original order wherever it is free. Nothing here is CPU-only: launchers allocate on
their inputs' device and run on CUDA as under the interpreter.
"""
import operator
from pathlib import Path

import networkx as nx
import torch
from torch.fx import Graph, GraphModule

from llmopt.codegen.fusion.emit import emit
from llmopt.codegen.fusion.loader import load
from llmopt.codegen.fusion.partition import partition
from llmopt.errors import LlmoptError


class FusedProgram:
    """A Program's graph with its fusion groups as generated Triton kernels; see the module docstring."""

    def __init__(self, program, gm: GraphModule, groups: list, sources: list):
        self.program = program
        self.gm = gm
        self.groups = groups
        self.sources = sources  # emit.KernelSource, one a group

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor = None) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V], as `Program.run`."""
        from llmopt.program import run_logits

        return run_logits(self.gm, input_ids, position_ids)

    __call__ = run

    def dump_kernels(self, directory) -> list:
        return _write(self.sources, directory)

    def __repr__(self):
        kinds = {}
        for group in self.groups:
            kinds[group.kind] = kinds.get(group.kind, 0) + 1
        return f"FusedProgram({len(self.groups)} kernels: {kinds})"


def fuse(program) -> FusedProgram:
    """Fuse a Program's pointwise chains and row reductions into generated kernels."""
    gm, groups, sources = _fused(program.gm)
    return FusedProgram(program, gm, groups, sources)


def fuse_graph_module(gm: GraphModule) -> GraphModule:
    """A new graph module (sharing `gm`'s weights) with a launcher call in place of each group."""
    return _fused(gm)[0]


def dump_kernels(program, directory) -> list:
    """Write the kernels of `program` (a Program, a FusedProgram or a graph module) as
    `<directory>/<group name>.py`; returns the paths."""
    if isinstance(program, FusedProgram):
        return program.dump_kernels(directory)
    return _write([emit(g) for g in partition(program.graph)], directory)


def _fused(gm: GraphModule):
    groups = partition(gm.graph)
    sources = [emit(g) for g in groups]
    launchers = [load(s) for s in sources]
    return GraphModule(gm, _rewrite(gm.graph, groups, launchers)), groups, sources


def _rewrite(graph: Graph, groups: list, launchers: list) -> Graph:
    unit = {node: i for i, group in enumerate(groups) for node in group.nodes}  # node -> its group

    def key(node):
        """A node of the contracted graph: the index of the node's group, or the node itself."""
        return unit.get(node, node)

    position = {}
    contracted = nx.DiGraph()
    for i, node in enumerate(graph.nodes):
        position[key(node)] = i  # a group sits where its last node was
        contracted.add_node(key(node))
        contracted.add_edges_from((key(a), key(node)) for a in node.all_input_nodes if key(a) != key(node))
    fused, env = Graph(), {}
    for item in nx.lexicographical_topological_sort(contracted, key=position.__getitem__):
        if not isinstance(item, int):
            env[item] = fused.node_copy(item, env.__getitem__)
            continue
        group = groups[item]
        single = len(group.outputs) == 1
        name = group.outputs[0].name if single else group.name
        call = fused.create_node("call_function", launchers[item], tuple(env[x] for x in group.inputs), name=name)
        call.meta["fusion_group"] = group.name
        if single:
            call.meta["val"] = group.outputs[0].meta.get("val")
            env[group.outputs[0]] = call
            continue
        call.meta["val"] = tuple(out.meta.get("val") for out in group.outputs)
        for j, out in enumerate(group.outputs):
            item_node = fused.create_node("call_function", operator.getitem, (call, j), name=out.name)
            item_node.meta["val"] = out.meta.get("val")
            env[out] = item_node
    fused.lint()
    return fused


def _write(sources: list, directory) -> list:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LlmoptError(f"dump_kernels: {directory} is a file; give a directory (it is created if missing)")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sources:
        path = directory / f"{source.name}.py"
        path.write_text(source.text)
        paths.append(path)
    return paths
