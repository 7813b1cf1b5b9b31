"""Exact cleanup passes: `DeadCodeElimination()` and `ConstantFolding()`.

ConstantFolding evaluates every node whose inputs are all weights or literals (no activation reaches
it) once, stores the value as a new weight, and rewires its users: it is what turns a rewritten
`W + s·(B @ A)` into one merged weight. Nodes producing large tensors from small ones (an `expand` of
a scalar, say) are left alone so folding never grows the model.
"""
import torch

from llmopt.passes_api import Pass, PassResult

_NEVER_FOLD = {torch.ops.aten.arange.default, torch.ops.aten.ones.default, torch.ops.aten.zeros.default, torch.ops.aten.full.default, torch.ops.aten.new_ones.default}


class DeadCodeElimination(Pass):
    def apply(self, program, calibration):
        before = len(program.graph.nodes)
        program.graph.eliminate_dead_code()
        program.remove_unused_weights()
        program.recompile()
        removed = before - len(program.graph.nodes)
        return PassResult(program, removed > 0, {"nodes_removed": removed})


class ConstantFolding(Pass):
    def apply(self, program, calibration):
        constant = {n for n in program.graph.nodes if n.op == "get_attr"}
        folded = 0
        for node in list(program.graph.nodes):
            if node.op != "call_function" or node.target in _NEVER_FOLD or not _inputs_constant(node, constant):
                continue
            args = torch.fx.node.map_arg(node.args, lambda a: program.get_weight(a))
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: program.get_weight(a))
            with torch.no_grad():
                value = node.target(*args, **kwargs)
            if not isinstance(value, torch.Tensor) or value.numel() > max(_input_numel(node, program), 1):
                continue
            weight = program.add_weight(f"folded_{node.name}", value.contiguous(), like=node)
            weight.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(weight)
            program.graph.erase_node(node)
            constant.add(weight)
            folded += 1
        program.graph.eliminate_dead_code()
        program.remove_unused_weights()
        program.recompile()
        return PassResult(program, folded > 0, {"nodes_folded": folded})


def _inputs_constant(node, constant) -> bool:
    inputs = node.all_input_nodes
    return bool(inputs) and all(n in constant for n in inputs)


def _input_numel(node, program) -> int:
    return max(program.get_weight(n).numel() for n in node.all_input_nodes)
