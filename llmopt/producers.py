"""For each linear, the op that produced its input, found from the graph alone.

Entry point: `input_groups(program) -> list[InputGroup]`: the linears that share one input value,
with the producer of that value:
- `norm`: a norm feeds them directly (q/k/v after the attention norm, gate/up after the MLP norm);
- `linear`: another linear's output reaches them through layout ops only, through attention's value
  input (v → o), through a gated product (up → down in SiLU·mul MLPs) or through ReLU;
- `other`: anything else (GELU between fc1 and fc2, say).
`fold_scales(program, group, s)` divides the producer's output channels by `s` and multiplies the
consumers' input columns by `s`, which keeps the function exactly (for `other`, and for scales that are
not equal over a group's `ties`, an explicit scale node is inserted). Under GQA each of v's channels
feeds one channel of every query head of its KV head; those o_proj inputs are a group's `ties`, and a
scale equal over them folds into v. Smooth and AWQ are built on these two functions.

Channel maps (which producer channel feeds which consumer input channel) are measured, not assumed:
one probe run of the Program on a single token writes each producer channel's index into its output
and reads where the indices land at the consumers' input (see `_probe_channel_maps`).
"""
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

from llmopt.errors import PassError

from llmopt.roles import ATTENTION_OPS, CAST_OPS, LAYOUT_OPS, Linear, Norm, _llmopt, find_norms, linear_parts

aten = torch.ops.aten
_POSITIVE_HOMOGENEOUS = {aten.relu.default}
_ACTIVATIONS = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default}


@dataclass
class InputGroup:
    """Linears sharing one input, and what produced that input."""

    consumers: list  # [Linear], all reading `value`
    value: Node  # the consumers' common input
    kind: str  # 'norm' | 'linear' | 'other'
    norm: Optional[Norm] = None
    producer: Optional[Linear] = None
    channel_map: Optional[torch.Tensor] = None  # [K] long: consumer input channel j <- producer channel map[j]
    path: list = field(default_factory=list)  # nodes from the consumers' input back to the producer

    @property
    def name(self) -> str:
        return ",".join(c.name for c in self.consumers)

    @property
    def foldable(self) -> bool:
        """Whether scales can be folded into the producer (else a scale node is inserted); when the
        producer's channels each feed several consumer channels, only scales equal over `ties` fold."""
        if self.kind == "norm":
            return True
        return self.kind == "linear" and self.channel_map is not None and self.producer.kind == "dense"

    @property
    def ties(self) -> Optional[torch.Tensor]:
        """[K] long, or None when every channel can take its own scale: consumer channels with equal
        entries read one producer channel (v's channels under GQA, each read by the query heads of its
        KV head), so a scale folds into the producer only if it is equal over them."""
        if self.foldable and self.kind == "linear" and self.channel_map.unique().numel() < self.channel_map.numel():
            return self.channel_map
        return None


def input_groups(program, include_lm_head: bool = False) -> list:
    """Every set of linears sharing an input (the lm head left out unless asked), in graph order."""
    head = program.lm_head()
    by_input = {}
    for lin in program.linears():
        if head is not None and lin.node is head.node and not include_lm_head:
            continue
        by_input.setdefault(lin.input, []).append(lin)
    norms = {n.node: n for n in find_norms(program)}
    groups = [_classify(value, consumers, norms) for value, consumers in by_input.items()]
    probes = [g for g in groups if g.kind == "linear"]
    if probes:
        _probe_channel_maps(program, probes)
    return groups


def _classify(value: Node, consumers: list, norms: dict) -> InputGroup:
    node, path = value, []
    while isinstance(node, Node) and node.op == "call_function":
        path.append(node)
        if node in norms:
            return InputGroup(consumers, value, "norm", norm=norms[node], path=path)
        lin = linear_parts(node)
        if lin is not None:
            return InputGroup(consumers, value, "linear", producer=lin, path=path)
        if node.target in LAYOUT_OPS or node.target is operator.getitem or node.target in _POSITIVE_HOMOGENEOUS:
            node = node.args[0]
        elif node.target in ATTENTION_OPS or node.target == _llmopt("attention"):
            node = node.args[2]  # the value input: attention is linear in v
        elif node.target == aten.mul.Tensor and _gated_side(node) is not None:
            node = _gated_side(node)
        else:
            break
    return InputGroup(consumers, value, "other", path=path)


def _gated_side(mul: Node) -> Optional[Node]:
    """In act(gate) * up, the `up` operand (linear in the product); None if `mul` is not such a product."""
    a, b = mul.args
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    for gate, up in ((a, b), (b, a)):
        if gate.op == "call_function" and gate.target in _ACTIVATIONS and linear_parts(_strip(up)) is not None:
            return up
    return None


def _strip(node: Node) -> Node:
    while isinstance(node, Node) and node.op == "call_function" and (node.target in LAYOUT_OPS or node.target is operator.getitem):
        node = node.args[0]
    return node


class _IndexProbe(torch.fx.Interpreter):
    """Runs one token through the graph; each producer's output is replaced by its channel indices
    (float64, kept in `self.probe`) and the path to the consumers carries them: attention passes v
    through (one key, weight exactly 1) and a gated product passes the `up` side (the gate reads as 1).
    Every other node sees ordinary values in the graph's dtypes."""

    def __init__(self, gm, groups):
        super().__init__(gm, garbage_collect_values=False)
        self.producers = {g.producer.node for g in groups}
        self.path = {n for g in groups for n in g.path}
        self.probe = {}

    def run_node(self, n):
        on_path = n in self.path and n not in self.producers
        result = None if on_path else super().run_node(n)
        if n in self.producers:
            width = result.shape[-1]
            self.probe[n] = torch.arange(width, dtype=torch.float64, device=result.device).expand(result.shape).contiguous()
        elif on_path:
            args = torch.fx.node.map_arg(n.args, lambda a: self.probe.get(a, self.env.get(a)))
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: self.probe.get(a, self.env.get(a)))
            if n.target in ATTENTION_OPS or n.target == _llmopt("attention"):
                q, v = args[0], args[2]
                self.probe[n] = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # [B, Hq, 1, D]
            elif n.target == aten.mul.Tensor:
                self.probe[n] = self.probe[_gated_side(n)]
            elif n.target in CAST_OPS:
                self.probe[n] = args[0]
            else:
                self.probe[n] = n.target(*args, **kwargs)
            result = self.probe[n].to(n.meta["val"].dtype) if isinstance(self.probe[n], torch.Tensor) else self.probe[n]
        return result


def _probe_channel_maps(program, groups):
    device = program.device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    probe = _IndexProbe(program.gm, groups)
    with torch.no_grad():
        probe.run(ids, ids.clone())
    for g in groups:
        got = probe.probe.get(g.value, probe.env[g.value]).reshape(-1)  # [K]
        width = program.get_weight(g.producer.weight).shape[0]
        if got.dtype == torch.float64 and torch.equal(got, got.round()) and got.min() >= 0 and got.max() < width:
            g.channel_map = got.long()


def fold_scales(program, group: InputGroup, s: torch.Tensor):
    """Divide the producer's output channels by s [K] and multiply consumers' input columns by s (a scale
    node instead of the producer's division when there is no producer, or s is not equal over `ties`)."""
    quantized = [lin.name for lin in group.consumers + ([group.producer] if group.producer is not None else []) if lin.kind != "dense"]
    if quantized:
        raise PassError(f"cannot fold scales into quantized linears ({', '.join(quantized)}): run Smooth/AWQ before quantizing")
    s = s.detach().float().to(program.device)
    if group.kind == "norm":
        norm = group.norm
        w = program.get_weight(norm.weight)
        program.set_weight(norm.weight, ((w.float() + norm.offset) / s - norm.offset).to(w.dtype))
        if norm.bias is not None:
            b = program.get_weight(norm.bias)
            program.set_weight(norm.bias, (b.float() / s).to(b.dtype))
    elif group.foldable and equal_over_ties(s, group.ties):
        lin = group.producer
        w = program.get_weight(lin.weight).float().clone()
        divisor = torch.ones(w.shape[0], device=w.device)
        divisor[group.channel_map] = s
        program.set_weight(lin.weight, (w / divisor[:, None]).to(program.get_weight(lin.weight).dtype))
        if lin.bias is not None:
            b = program.get_weight(lin.bias)
            program.set_weight(lin.bias, (b.float() / divisor).to(b.dtype))
    else:
        _insert_scale_node(program, group, s)
    for lin in group.consumers:
        w = program.get_weight(lin.weight)
        program.set_weight(lin.weight, (w.float() * s[None, :]).to(w.dtype))


def equal_over_ties(s: torch.Tensor, ties: Optional[torch.Tensor]) -> bool:
    """Whether s [K] takes one value over each set of channels with equal `ties` [K] (True for None)."""
    if ties is None:
        return True
    ties = ties.to(s.device)
    one_each = torch.zeros(int(ties.max()) + 1, dtype=s.dtype, device=s.device).scatter_(0, ties, s)  # one of each set's values
    return torch.equal(one_each[ties], s)


def _insert_scale_node(program, group: InputGroup, s: torch.Tensor):
    value = group.value
    dtype = program.dtype(value)
    scale = program.add_weight(f"{group.consumers[0].weight.target}_input_scale", (1.0 / s).to(dtype))
    with program.graph.inserting_after(value):
        scaled = program.graph.call_function(aten.mul.Tensor, (value, scale))
    for lin in group.consumers:
        lin.node.replace_input_with(value, scaled)
    group.value = scaled
    program.recompile()
