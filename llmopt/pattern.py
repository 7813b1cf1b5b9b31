"""Graph patterns written as small PyTorch functions, matched on a Program's graph.

Entry point: `Pattern(pattern, replacement, extra_check=None, name=None)` and
`Pattern.apply(program) -> int` (rewrites done; each also counted in the pass's stats by `rewrite`).

- `pattern(*args)`: a function of the pattern's inputs written with `torch.ops.aten.*` ops, as they
  appear in a captured graph; it is traced with torch.fx. Every input matches any value (a weight,
  an activation); scalars in the pattern match any scalar (`match.literal(...)` reads them).
- `replacement`: either a function of the same inputs (traced and spliced in place of the match), or
  `callable(program, match) -> Node` for rewrites that compute new weights (`program.add_weight`).
- `extra_check(program, match) -> bool`: an optional extra condition (dtype, shape, weights only, ...).
`Match.inputs` maps each pattern argument name to the graph node it matched; `Match.node(name)` gives
the graph node matched by the pattern node of that name (e.g. `"mul"`).
"""
import inspect
from dataclasses import dataclass

import torch
from torch.fx import Node
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher


@dataclass
class Match:
    inputs: dict  # pattern argument name -> graph Node (or literal)
    nodes: dict  # pattern node name -> graph Node
    output: Node  # the graph node whose value the pattern computes

    def node(self, pattern_name: str) -> Node:
        """The graph node matched by the pattern node named `pattern_name` (as torch.fx named it,
        e.g. 'mul_tensor'), or by the pattern's only node of that op ('mul')."""
        if pattern_name in self.nodes:
            return self.nodes[pattern_name]
        hits = [g for p, g in self.nodes.items() if p.rsplit("_", 1)[0] == pattern_name or p.split("_")[0] == pattern_name]
        if len(hits) != 1:
            raise KeyError(f"pattern node {pattern_name!r} is not unique or absent; names: {sorted(self.nodes)}")
        return hits[0]

    def literal(self, pattern_name: str, index: int):
        """The `index`-th argument of the graph node matched by pattern node `pattern_name`."""
        return self.node(pattern_name).args[index]


class Pattern:
    def __init__(self, pattern, replacement, extra_check=None, name: str = None):
        self.name = name or pattern.__name__
        self.arg_names = list(inspect.signature(pattern).parameters)
        self.pattern_gm = torch.fx.symbolic_trace(pattern)
        self.replacement = replacement
        self.replacement_gm = torch.fx.symbolic_trace(replacement) if _is_traceable(replacement, self.arg_names) else None
        self.extra_check = extra_check

    def matches(self, program) -> list:
        matcher = SubgraphMatcher(self.pattern_gm.graph, match_output=False, match_placeholder=False,
                                  remove_overlapping_matches=True, ignore_literals=True)
        found = []
        for internal in matcher.match(program.graph):
            placeholders = [n for n in self.pattern_gm.graph.nodes if n.op == "placeholder"]
            inputs = {name: internal.nodes_map[p] for name, p in zip(self.arg_names, placeholders)}
            nodes = {p.name: g for p, g in internal.nodes_map.items() if p.op == "call_function"}
            match = Match(inputs, nodes, internal.returning_nodes[0])
            if self.extra_check is None or self.extra_check(program, match):
                found.append(match)
        return found

    def apply(self, program) -> int:
        """Rewrite every non-overlapping match; returns how many were rewritten."""
        count = 0
        replaced = {}  # graph node -> the node that now stands for it (a match's input may be an earlier match's output)

        def current(value):
            while isinstance(value, Node) and value in replaced:
                value = replaced[value]
            return value

        for match in self.matches(program):
            match.inputs = {name: current(v) for name, v in match.inputs.items()}
            with program.graph.inserting_before(match.output):
                new = self._splice(program, match)
            new.meta.update({k: v for k, v in match.output.meta.items() if k == "val"})
            match.output.replace_all_uses_with(new)
            replaced[match.output] = new
            count += 1
        if count:
            program.graph.eliminate_dead_code()
            program.remove_unused_weights()
            program.recompile()
        return count

    def _splice(self, program, match) -> Node:
        if self.replacement_gm is None:
            return self.replacement(program, match)
        env = {}
        placeholders = [n for n in self.replacement_gm.graph.nodes if n.op == "placeholder"]
        for name, p in zip(self.arg_names, placeholders):
            env[p] = match.inputs[name]
        out = None
        for n in self.replacement_gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = env[n.args[0]]
                break
            env[n] = program.graph.node_copy(n, lambda a: env[a])
        return out


def _is_traceable(fn, arg_names) -> bool:
    """A replacement taking exactly the pattern's arguments is traced; (program, match) is called."""
    return list(inspect.signature(fn).parameters) == arg_names
