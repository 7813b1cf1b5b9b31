"""`FuseAttention()`: rewrite every attention subgraph into `torch.ops.llmopt.attention`. Exact.

Two forms are recognised, from the graph alone:
- `aten.scaled_dot_product_attention` (transformers' "sdpa" implementation);
- matmul → scale → (+ additive mask) → softmax → (cast) → matmul (the "eager" implementation).
In both, GQA's repeat of K/V heads (`unsqueeze → expand → reshape`, transformers' `repeat_kv`) is
removed: the llmopt op reads each KV head once for its whole group of query heads.
"""
import math

import torch
from torch.fx import Node

from llmopt.passes_api import Pass, PassResult
from llmopt.pattern import Pattern

aten = torch.ops.aten


def strip_repeat_kv(node: Node) -> Node:
    """reshape(expand(unsqueeze(x, 2), [B, Hkv, n_rep, S, D]), [B, Hkv*n_rep, S, D]) -> x."""
    if node.op == "call_function" and node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        expand = node.args[0]
        if expand.op == "call_function" and expand.target == aten.expand.default:
            unsq = expand.args[0]
            if unsq.op == "call_function" and unsq.target == aten.unsqueeze.default and unsq.args[1] == 2:
                return unsq.args[0]
    return node


def eager_attention(q, kt, v, mask):
    scores = aten.add.Tensor(aten.mul.Tensor(aten.matmul.default(q, kt), 1.0), mask)
    return aten.matmul.default(aten.to.dtype(aten.softmax.int(scores, -1, torch.float32), torch.float32), v)


def eager_attention_nocast(q, kt, v, mask):
    scores = aten.add.Tensor(aten.mul.Tensor(aten.matmul.default(q, kt), 1.0), mask)
    return aten.matmul.default(aten.softmax.int(scores, -1, torch.float32), v)


def _is_key_transpose(program, match) -> bool:
    kt = match.inputs["kt"]
    if not (isinstance(kt, Node) and kt.op == "call_function" and kt.target == aten.transpose.int):
        return False
    rank = len(kt.meta["val"].shape)
    return sorted(d % rank for d in kt.args[1:3]) == [rank - 2, rank - 1] and isinstance(match.literal("mul", 1), (int, float))


def _from_eager(program, match) -> Node:
    q, v, mask = match.inputs["q"], match.inputs["v"], match.inputs["mask"]
    k = strip_repeat_kv(match.inputs["kt"].args[0])
    scale = float(match.literal("mul", 1))
    return program.graph.call_function(torch.ops.llmopt.attention.default, (q, k, strip_repeat_kv(v), mask, scale, False))


class FuseAttention(Pass):
    def apply(self, program, calibration):
        fused = 0
        for node in list(program.graph.nodes):
            if node.op == "call_function" and node.target == aten.scaled_dot_product_attention.default:
                fused += _fuse_sdpa(program, node)
        program.graph.eliminate_dead_code()
        program.recompile()
        for fn in (eager_attention, eager_attention_nocast):
            fused += Pattern(fn, _from_eager, extra_check=_is_key_transpose, name="eager_attention").apply(program)
        return PassResult(program, fused > 0, {"attention_fused": fused})


def _fuse_sdpa(program, node: Node) -> int:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    if bound.get("dropout_p", 0.0) not in (0, 0.0):
        return 0
    q, k, v = bound["query"], bound["key"], bound["value"]
    mask = bound.get("attn_mask")
    scale = bound.get("scale") or 1.0 / math.sqrt(q.meta["val"].shape[-1])
    causal = bool(bound.get("is_causal", False)) and mask is None
    with program.graph.inserting_before(node):
        fused = program.graph.call_function(
            torch.ops.llmopt.attention.default, (q, strip_repeat_kv(k), strip_repeat_kv(v), mask, float(scale), causal)
        )
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    program.graph.erase_node(node)
    return 1
