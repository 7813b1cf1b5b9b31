"""Nodes by role, found from the graph alone (never from module or class names).

Entry points: `find_linears`, `find_norms`, `find_attentions`, `find_embeddings`, `find_lm_head`,
`role_of` (used by `Program`), and the small helpers passes use to walk through layout-only ops.

- linear: `aten.linear` (GPT-2's Conv1D is canonicalized to it at capture) or an llmopt quantized
  linear, with its weight a `get_attr`;
- norm: `aten.layer_norm`, or the RMSNorm subgraph `w ⊙ (x · rsqrt(mean(x²) + eps))`, where `w` is a
  weight or `1 + weight` (Gemma);
- attention: `aten.scaled_dot_product_attention` or `llmopt.attention`;
- embedding: `aten.embedding` of a weight; lm head: the linear whose output is the graph's output.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

import llmopt.ops  # noqa: F401  (registers torch.ops.llmopt.*)

aten = torch.ops.aten

CAST_OPS = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
    aten.alias.default, aten.clone.default, aten.contiguous.default,
}
LAYOUT_OPS = CAST_OPS | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
    aten.slice.Tensor, aten.split.Tensor, aten.chunk.default, aten.t.default,
}
ATTENTION_OPS = {aten.scaled_dot_product_attention.default}


def _llmopt(name):
    return getattr(torch.ops.llmopt, name).default


@dataclass
class Linear:
    """A linear-like node: y = x @ Wᵀ + b, possibly quantized (`kind` 'dense', 'w8a8' or 'wq')."""

    node: Node
    weight: Node  # get_attr of the weight [N, K] (int8 / packed uint8 when quantized)
    bias: Optional[Node]
    kind: str

    @property
    def input(self) -> Node:
        return self.node.args[0]

    @property
    def name(self) -> str:
        return self.weight.meta.get("weight_name", self.weight.target).removesuffix(".weight")


@dataclass
class Norm:
    """A normalization: layer_norm, or RMSNorm whose scale is `weight + offset` (offset 1 for Gemma)."""

    node: Node  # the node whose value is the normalized, scaled output
    weight: Node  # get_attr [C]
    bias: Optional[Node]
    offset: float
    kind: str  # 'layer' or 'rms'

    @property
    def name(self) -> str:
        return self.weight.meta.get("weight_name", self.weight.target).removesuffix(".weight")


@dataclass
class Attention:
    node: Node
    q: Node
    k: Node
    v: Node


@dataclass
class Embedding:
    node: Node
    weight: Node


def linear_parts(node: Node) -> Optional[Linear]:
    """The Linear view of a node, or None when it is not linear-like with a weight."""
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        weight = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        kind = "dense"
    elif node.target == _llmopt("linear_w8a8"):
        weight, bias, kind = node.args[1], node.args[3], "w8a8"
    elif node.target == _llmopt("linear_wq"):
        weight, bias, kind = node.args[1], node.args[4], "wq"
    else:
        return None
    if not isinstance(weight, Node) or weight.op != "get_attr":
        return None
    return Linear(node, weight, bias if isinstance(bias, Node) else None, kind)


def find_linears(program) -> list:
    return [lin for n in program.graph.nodes if (lin := linear_parts(n)) is not None]


def find_embeddings(program) -> list:
    return [
        Embedding(n, n.args[0])
        for n in program.graph.nodes
        if n.op == "call_function" and n.target == aten.embedding.default and n.args[0].op == "get_attr"
    ]


def find_attentions(program) -> list:
    found = []
    for n in program.graph.nodes:
        if n.op == "call_function" and (n.target in ATTENTION_OPS or n.target == _llmopt("attention")):
            found.append(Attention(n, *n.args[:3]))
    return found


def find_lm_head(program) -> Optional[Linear]:
    """The linear whose value reaches the graph output through layout ops only."""
    output = next(n for n in program.graph.nodes if n.op == "output")
    value = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    return linear_parts(through_layout(value, backwards=True))


def find_norms(program) -> list:
    norms = []
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target == aten.layer_norm.default and len(n.args) > 2 and _is_weight(n.args[2]):
            bias = n.args[3] if len(n.args) > 3 and _is_weight(n.args[3]) else None
            norms.append(Norm(n, n.args[2], bias, 0.0, "layer"))
        elif n.target == aten.mul.Tensor:
            norm = _rms_norm_at(n)
            if norm is not None:
                norms.append(norm)
    return norms


def _rms_norm_at(mul: Node) -> Optional[Norm]:
    """mul(scale, normalized) in either order, scale = w or 1 + w, normalized = x * rsqrt(mean(x²)+eps)."""
    for scale_arg, other in (mul.args, mul.args[::-1]):
        if not isinstance(scale_arg, Node) or not isinstance(other, Node):
            continue
        weight, offset = _scale_weight(scale_arg)
        if weight is None or not _is_rms_normalized(skip_casts(other)):
            continue
        return Norm(mul, weight, None, offset, "rms")
    return None


def _scale_weight(node: Node):
    node = skip_casts(node)
    if _is_weight(node):
        return node, 0.0
    if node.op == "call_function" and node.target == aten.add.Tensor:
        base, const = node.args
        if isinstance(const, (int, float)) and _is_weight(skip_casts(base)):
            return skip_casts(base), float(const)
    return None, 0.0


def _is_rms_normalized(node: Node) -> bool:
    if node.op != "call_function" or node.target != aten.mul.Tensor:
        return False
    for a, b in (node.args, node.args[::-1]):
        if isinstance(b, Node) and b.op == "call_function" and b.target == aten.rsqrt.default:
            inner = b.args[0]
            if inner.op == "call_function" and inner.target == aten.add.Tensor:
                mean = inner.args[0]
                return isinstance(mean, Node) and mean.target == aten.mean.dim and mean.args[0].target == aten.pow.Tensor_Scalar
    return False


def _is_weight(node) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def skip_casts(node: Node) -> Node:
    """Follow dtype casts and aliases back to the node that computed the value."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in CAST_OPS:
        node = node.args[0]
    return node


def through_layout(node: Node, backwards: bool = True) -> Node:
    """Follow layout-only ops (views, transposes, slices, casts, getitem of a split) back to their source."""
    import operator

    while isinstance(node, Node) and node.op == "call_function" and (node.target in LAYOUT_OPS or node.target is operator.getitem):
        node = node.args[0]
    return node


def role_of(program, node: Node) -> str:
    """'linear', 'norm', 'attention', 'embedding', 'lm_head' or '' (for dumps)."""
    if linear_parts(node) is not None:
        head = program.lm_head()
        return "lm_head" if head is not None and head.node is node else "linear"
    if node.op == "call_function" and (node.target in ATTENTION_OPS or node.target == _llmopt("attention")):
        return "attention"
    if node.op == "call_function" and node.target == aten.embedding.default:
        return "embedding"
    if node.op == "call_function" and node.target in (aten.layer_norm.default, aten.mul.Tensor):
        if node.target == aten.layer_norm.default or _rms_norm_at(node) is not None:
            return "norm"
    return ""
