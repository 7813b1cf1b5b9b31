"""Retyping a Program captured in fp32 to a 16-bit dtype, keeping transformers' fp32 islands.

Entry points, called by `Program.to(dtype=...)`: `retype_casts(program, dtype)` before the weights
change dtype, `cast_matmul_inputs(program, dtype)` after.

In an fp32 capture, transformers' upcasts (`x.float()` before RMSNorm's statistics, RoPE's angles)
and its casts back (`.to(input_dtype)`) are both casts to fp32, and torch.export aliases a no-op cast
to its input, so the graph no longer says which is which. The rule here recovers it from the graph:
a cast to fp32 stays fp32 when its input is an integer, a weight or a buffer, or when its value feeds
a reduction (pow/mean/sum/var/softmax: the statistics transformers keeps in fp32); every other cast
to fp32 is a cast back and becomes `dtype`. Where an fp32 value then reaches a matmul-like op next
to a `dtype` weight (the residual stream may stay fp32, which is more precise), a cast is inserted
at that input.
"""
import torch
from torch.fx import Node

aten = torch.ops.aten

_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}
_REDUCTIONS = {aten.pow.Tensor_Scalar, aten.mean.dim, aten.sum.dim_IntList, aten.var.correction, aten.softmax.int,
               aten._softmax.default, aten.layer_norm.default, aten.rsqrt.default}
_PASS_THROUGH = {aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.transpose.int,
                 aten.expand.default, aten.clone.default, aten.contiguous.default, aten.alias.default}
_MATMUL_LIKE = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default,
                aten.scaled_dot_product_attention.default, aten.embedding.default}


def retype_casts(program, dtype: torch.dtype):
    """Casts back to the model dtype become `dtype`; fp32 islands stay (needs fresh meta)."""
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in _CASTS and not _keeps_fp32(node):
            node.args = torch.fx.node.map_aggregate(node.args, lambda a: dtype if a == torch.float32 else a)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda a: dtype if a == torch.float32 else a)


def _keeps_fp32(cast: Node) -> bool:
    source = cast.args[0]
    if not isinstance(source, Node) or source.op == "get_attr":
        return True
    val = source.meta.get("val")
    if isinstance(val, torch.Tensor) and not val.is_floating_point():
        return True
    return _feeds_reduction(cast)


def _feeds_reduction(node: Node, depth: int = 3) -> bool:
    for user in node.users:
        if user.op != "call_function":
            continue
        if user.target in _REDUCTIONS:
            return True
        if depth and user.target in _PASS_THROUGH and _feeds_reduction(user, depth - 1):
            return True
    return False


def cast_matmul_inputs(program, dtype):
    """Insert a cast where an fp32 activation meets a matmul-like op of the new dtype."""
    inserted = 0
    for node in list(program.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMUL_LIKE and not _is_llmopt_attention(node):
            continue
        for arg in node.all_input_nodes:
            val = arg.meta.get("val")
            if arg.op != "get_attr" and isinstance(val, torch.Tensor) and val.dtype == torch.float32:
                with program.graph.inserting_before(node):
                    cast = program.graph.call_function(aten.to.dtype, (arg, dtype))
                node.replace_input_with(arg, cast)
                inserted += 1
    return inserted


def _is_llmopt_attention(node: Node) -> bool:
    return node.target == torch.ops.llmopt.attention.default
