"""Fusion groups: connected pointwise ops and row reductions, each to become one kernel.

Entry point: `partition(graph) -> list[FusionGroup]` for a Program's graph (or any fx graph whose
nodes carry `meta["val"]`, such as the lowered graphs of `llmopt.codegen.lower`).

1. Candidates are the nodes `ops.fusible` accepts. networkx gives the connected components of the
   subgraph they induce (edges producer -> consumer). RoPE needs no group kind of its own: `slice`
   and `cat` on the last dim are candidates that the kernel writer turns into column remaps, so
   `q * cos + cat(-q[..., h:], q[..., :h]) * sin` (and partial-rotary cats) is one pointwise group.
2. Each component is split greedily in graph (topological) order: a node joins the groups of its
   producers when the union stays *convex* (no path leaves the group and comes back: the group must
   not both feed and consume an outside node, or one kernel call could not replace it) and has
   leading dims that broadcast to one row space. Otherwise it starts a group. So a residual add joins
   the RMSNorm after it but not the one before it (the attention or MLP block in between both
   consumes that norm and feeds the add). A group may hold several reductions: its programs hold
   whole rows, so an RMSNorm and the per-token int8 quantization of its output (an `amax`) are one
   kernel, as are a softmax's max and sum.
3. A group computes rows of its iteration space `[*lead, K]`: every output must have exactly that
   shape, or `[*lead, 1]` (a row value such as a reduction). For an output that fits neither, the
   partition is redone with a cut where its shape begins (e.g. at a `slice` to a narrower width: the
   slice starts a group of its own); if that cut was made already, the output is left to eager.
4. Groups of pure data movement (casts, slices, cats only) are dropped: eager does them as well.

On a 2-layer Llama this gives 12 groups: 5 RMSNorms (4 with their residual add), 2 SiLU·mul, 4 RoPE
applications (q and k, rotate_half included) and 1 RoPE cos/sin table.
"""
from dataclasses import dataclass
from typing import Optional

import networkx as nx
import torch
from torch.fx import Graph, Node

from llmopt.codegen.fusion import ops


@dataclass
class FusionGroup:
    nodes: list  # fx nodes, in graph order
    inputs: list  # values the group reads from outside it, in first-use order
    outputs: list  # group values used outside it, in graph order
    lead: tuple  # leading (row) dims of the iteration space: ints and sympy expressions
    width: int  # K: the last dim of every full-width output
    reductions: list  # the group's row reductions (mean/sum/amax/layer_norm), in graph order

    @property
    def kind(self) -> str:
        """'pointwise', or the reductions' names in order of first use: 'mean', 'mean_amax', ..."""
        names = dict.fromkeys(ops.reduction_name(n) for n in self.reductions)
        return "_".join(names) or "pointwise"

    @property
    def name(self) -> str:
        """Unique in its graph: the kind and the last output's node name, e.g. 'fused_mean_mul_18'."""
        return f"fused_{self.kind}_{self.outputs[-1].name}"

    @property
    def max_width(self) -> int:
        """The widest value the group computes."""
        return max(width(n) for n in self.nodes)

    @property
    def whole_rows(self) -> bool:
        """Does a program hold whole rows? Yes with a reduction, or an output of one value a row
        (column blocks would all compute it); otherwise programs take column blocks too."""
        return bool(self.reductions) or any(width(o) == 1 for o in self.outputs)


def shape(node: Node) -> tuple:
    """A value's shape: ints, and sympy expressions for symbolic dims."""
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else int(d) for d in node.meta["val"].shape)


def width(node: Node) -> int:
    """The last dim (1 for a 0-d value)."""
    s = shape(node)
    return s[-1] if s else 1


def padded_lead(node: Node, rank: int) -> tuple:
    """The leading dims of a value right-aligned to an iteration space of `rank` dims (1s in front)."""
    s = shape(node)
    return ((1,) * (rank - max(len(s), 1)) + s[:-1]) if s else (1,) * (rank - 1)


def partition(graph: Graph) -> list:
    """Fusion groups of `graph`, in graph order; see the module docstring."""
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from((arg, node) for node in graph.nodes for arg in node.all_input_nodes)
    order = {node: i for i, node in enumerate(graph.nodes)}
    cuts, evicted = set(), set()
    while True:
        candidates = [n for n in graph.nodes if n not in evicted and ops.fusible(n)]
        groups = []
        for component in nx.weakly_connected_components(dag.subgraph(candidates)):
            groups += [_describe(nodes) for nodes in _split(sorted(component, key=order.get), dag, order, cuts)]
        misfits = [(group, out) for group in groups for out in _misfits(group)]
        if not misfits:
            return sorted((g for g in groups if not _data_movement_only(g)), key=lambda g: order[g.nodes[0]])
        for group, out in misfits:
            point = _cut_point(group, out)
            if point in cuts:
                evicted.add(out)
            cuts.add(point)


def _split(component: list, dag: nx.DiGraph, order: dict, cuts: set) -> list:
    """Greedy split of a component (in graph order) into valid groups (lists of nodes); a node in
    `cuts` starts a group."""
    owner = {}  # node -> group index
    groups = []  # index -> set of nodes (merged ones left empty)
    for node in component:
        producers = [] if node in cuts else sorted({owner[p] for p in dag.predecessors(node) if p in owner})
        options = ([producers] if len(producers) > 1 else []) + [[g] for g in producers]
        chosen = next((opt for opt in options if _valid(set().union(*(groups[g] for g in opt)) | {node}, dag, order)), None)
        if chosen is None:
            groups.append({node})
            owner[node] = len(groups) - 1
            continue
        keep = chosen[0]
        for g in chosen[1:]:
            for member in groups[g]:
                owner[member] = keep
            groups[keep] |= groups[g]
            groups[g] = set()
        groups[keep].add(node)
        owner[node] = keep
    return [sorted(g, key=order.get) for g in groups if g]


def _valid(nodes: set, dag: nx.DiGraph, order: dict) -> bool:
    return _common_lead(nodes) is not None and _convex(nodes, dag, order)


def _convex(nodes: set, dag: nx.DiGraph, order: dict) -> bool:
    """No path from the group through an outside node back into the group.

    Such a path ends at a group node, so it only visits nodes before the group's last one (graph
    order is topological): the search stays inside that window."""
    last = max(order[n] for n in nodes)
    frontier = [u for n in nodes for u in dag.successors(n) if u not in nodes and order[u] < last]
    seen = set(frontier)
    while frontier:
        for user in dag.successors(frontier.pop()):
            if user in nodes:
                return False
            if user not in seen and order[user] < last:
                seen.add(user)
                frontier.append(user)
    return True


def _common_lead(nodes) -> Optional[tuple]:
    """The leading dims every node's leading dims broadcast to, or None when they do not."""
    rank = max(max(len(shape(n)), 1) for n in nodes)
    lead = []
    for dims in zip(*(padded_lead(n, rank) for n in nodes)):
        sizes = {d for d in dims if not (isinstance(d, int) and d == 1)}
        if len(sizes) > 1:
            return None
        lead.append(sizes.pop() if sizes else 1)
    return tuple(lead)


def _describe(nodes: list) -> FusionGroup:
    members = set(nodes)
    inputs = []
    for node in nodes:
        for arg in ops.operands(node):
            if arg not in members and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in nodes if any(user not in members for user in n.users)]
    reductions = [n for n in nodes if ops.is_reduction(n)]
    k = max(width(o) for o in outputs)
    return FusionGroup(nodes, inputs, outputs, _common_lead(nodes), k, reductions)


def _misfits(group: FusionGroup) -> list:
    """Outputs whose shape is neither `[*lead, K]` nor `[*lead, 1]`, and row outputs of groups too
    wide to hold whole rows."""
    rank = len(group.lead) + 1
    too_wide = group.max_width > ops.MAX_ROW
    return [o for o in group.outputs
            if len(shape(o)) != rank or padded_lead(o, rank) != group.lead or width(o) not in (1, group.width)
            or (width(o) == 1 and too_wide)]


def _cut_point(group: FusionGroup, out: Node) -> Node:
    """Where a misfit output's shape begins: back from it through producers of its own shape."""
    members, node = set(group.nodes), out
    while True:
        same = [p for p in ops.operands(node) if p in members and shape(p) == shape(node)]
        if not same:
            return node
        node = same[0]


def _data_movement_only(group: FusionGroup) -> bool:
    return all(ops.kind(n) in ("cast", "slice", "cat") for n in group.nodes)
