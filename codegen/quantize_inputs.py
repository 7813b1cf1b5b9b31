"""W8A8 linears of a lowered graph: one activation quantization per shared input, one int8 GEMM per linear.

Entry point: `split_w8a8(gm, generated=True) -> int` (the number of quantizations written);
`llmopt.codegen.lower` calls it on its copy of the Program's graph.

`llmopt.linear_w8a8(x, W8, s_w, bias, act_scale)` quantizes its input itself, so q, k and v (gate and
up) would each quantize the one normed activation they read. Here the W8A8 linears that read one value
with one activation scale share one quantization of it, and each becomes
`linear_int8(q, s_x, W8, s_w, bias, dtype)` (`codegen/kernels/w8a8_gemm.py`: the int8 GEMM with scales
and bias in its epilogue). The quantization is
- generated (`generated=True`): the reference's ATen ops written into the graph, per token
  `s_x = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127` and `q = round(x.float() / s_x)
  .clamp(-127, 127).to(int8)` (with a static per-tensor scale, s_x is that weight and only q is
  written). The fusion partitioner (`codegen/fusion`) puts them into the kernel that makes x: the
  RMSNorm (+ residual add) before q/k/v and gate/up, SiLU·mul before down; o_proj's input (attention's
  output, through a transpose) gets a kernel of its own;
- else (no fusion, or rows wider than a generated kernel holds in registers) one `quantize_rows` launch.
Both are bit-identical to `llmopt.ops.linear_w8a8.quantize_per_token` / `quantize_static` on the
weights' device: torch divides a tensor by the Python scalar 127 as a product with the fp32 reciprocal
on CUDA and as a true division on CPU, so the written scale step is that product on CUDA, that division
elsewhere.
"""
import operator
from collections import defaultdict

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from llmopt.codegen.fusion.ops import MAX_ROW
from llmopt.codegen.kernels.quantize_rows import quantize_rows
from llmopt.codegen.kernels.w8a8_gemm import linear_int8
from llmopt.ops.linear_w8a8 import INT8_MAX, INV_INT8_MAX

aten = torch.ops.aten
_W8A8_PARAMS = ("x", "weight", "weight_scale", "bias", "act_scale")


def quantize_activations(x: torch.Tensor, act_scale):
    """x: [..., K] -> (q: [..., K] int8, s_x: [..., 1] fp32), one `quantize_rows` launch; with a static
    `act_scale` ([1] fp32), s_x is `act_scale` itself."""
    q, scale = quantize_rows(x.reshape(-1, x.shape[-1]).contiguous(), act_scale)  # q: [M, K], scale: [M, 1]
    if act_scale is not None:
        return q.reshape(x.shape), act_scale
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def split_w8a8(gm: GraphModule, generated: bool = True) -> int:
    """Rewrite the `llmopt.linear_w8a8` nodes of `gm` (see the module docstring); returns how many
    quantizations it wrote, one per (input, activation scale) pair."""
    sharing = defaultdict(list)  # (x, act_scale) -> the W8A8 linears that read them, in graph order
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.llmopt.linear_w8a8.default:
            args = _bound(node)
            sharing[args["x"], args["act_scale"]].append(node)
    for (x, act_scale), linears in sharing.items():
        writer = _Writer(gm.graph, x.meta["val"].fake_mode)
        width = x.meta["val"].shape[-1]
        with gm.graph.inserting_before(linears[0]):
            if generated and isinstance(width, int) and width <= MAX_ROW:
                q, scale = _generated(writer, x, act_scale, _on_cuda(gm, linears[0]))
            else:
                q, scale = _template(writer, x, act_scale)
        for linear in linears:
            args = _bound(linear)
            linear.target = linear_int8
            linear.args = (q, scale, args["weight"], args["weight_scale"], args["bias"], x.meta["val"].dtype)
            linear.kwargs = {}
    return len(sharing)


def _generated(writer, x: Node, act_scale, on_cuda: bool) -> tuple:
    """(q, s_x) as ATen nodes, the reference's ops in the reference's order."""
    call = writer.call
    xf = call(aten._to_copy.default, x, dtype=torch.float32)  # [..., K]
    scale = act_scale
    if act_scale is None:
        amax = call(aten.clamp_min.default, call(aten.amax.default, call(aten.abs.default, xf), [-1], True), 1e-8)  # [..., 1]
        divide = (aten.mul.Tensor, INV_INT8_MAX) if on_cuda else (aten.div.Tensor, INT8_MAX)
        scale = call(divide[0], amax, divide[1], name=f"{x.name}_scale")  # [..., 1]
    rounded = call(aten.round.default, call(aten.div.Tensor, xf, scale))  # [..., K]
    q = call(aten._to_copy.default, call(aten.clamp.default, rounded, -INT8_MAX, INT8_MAX), dtype=torch.int8, name=f"{x.name}_int8")
    return q, scale


def _template(writer, x: Node, act_scale) -> tuple:
    """(q, s_x) from one `quantize_activations` node."""
    val = x.meta["val"]
    q_val = writer.fake(aten._to_copy.default, val, dtype=torch.int8)  # [..., K] int8
    scale_val = act_scale.meta["val"] if act_scale is not None else writer.fake(aten.amax.default, val.float(), [-1], True)
    pair = writer.graph.create_node("call_function", quantize_activations, (x, act_scale), name=f"{x.name}_quantized")
    pair.meta["val"] = (q_val, scale_val)
    q = writer.graph.create_node("call_function", operator.getitem, (pair, 0), name=f"{x.name}_int8")
    q.meta["val"] = q_val
    if act_scale is not None:
        return q, act_scale
    scale = writer.graph.create_node("call_function", operator.getitem, (pair, 1), name=f"{x.name}_scale")
    scale.meta["val"] = scale_val
    return q, scale


class _Writer:
    """Writes ATen nodes with `meta["val"]` from the fake tensors (symbolic dims kept) of their inputs."""

    def __init__(self, graph: Graph, mode):
        self.graph, self.mode = graph, mode

    def fake(self, target, *args, **kwargs):
        with self.mode, enable_python_dispatcher():
            return target(*args, **kwargs)

    def call(self, target, *args, name: str = None, **kwargs) -> Node:
        node = self.graph.create_node("call_function", target, args, kwargs, name=name)
        fake_args, fake_kwargs = map_arg((args, kwargs), lambda n: n.meta["val"])
        node.meta["val"] = self.fake(target, *fake_args, **fake_kwargs)
        return node


def _bound(node: Node) -> dict:
    """linear_w8a8's arguments by name."""
    return {**dict(zip(_W8A8_PARAMS, node.args)), **node.kwargs}


def _on_cuda(gm: GraphModule, linear: Node) -> bool:
    weight = _bound(linear)["weight"]
    if weight.op == "get_attr":
        return getattr(gm, weight.target).is_cuda
    return weight.meta["val"].is_cuda
