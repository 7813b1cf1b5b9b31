"""AWQ's learned rounding (`AWQ(rounding="learned")`): SignRound on each stage's block of the graph.

Entry point: `tune_stage(run, reference, stage_end, entries, steps) -> TunedStage | None`.

A stage's block is the graph from the stage's start (where the staged run's cut is) to `stage_end`, the next
stage's start (or the lm head): it holds the stage's linears and what lies between them and the next stage,
such as attention (q/k/v), SiLU·up (gate/up) and the residual adds. Its outputs are the values computed in the
block that later nodes read (the residual stream, the next block's norm input). The loss of one calibration
chunk compares them with the float model's values at the same cut, run by `reference` (a `StagedRun` of
the Program as it was before the pass) over the same chunks: each output's mean squared error over the
mean square of its float value, summed. So a stage corrects the error that the stages before it left in
its inputs too, not only its own (SignRound's targets are the float block's outputs).
The chunk's inputs are the quantized model's values at the cut, as the staged run keeps them.

A block holding an op without a gradient (llmopt's custom ops: a fused attention, an already quantized
linear) is not tuned: its linears keep round to nearest. Names map nodes between the two graphs; a value
the float graph lacks (a scale node inserted by a fold) is left out of the loss.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

from llmopt.passes.compress.learned_rounding import LearnedRounding, tune_rounding


@dataclass
class TunedStage:
    quantized: list  # [(Linear, QuantizedWeight)], the stage's linears with their tuned codes and scales
    accepted: bool  # False: the tuned loss was not lower, so these are round to nearest's
    loss_before: float
    loss_after: float


def tune_stage(run, reference, stage_end: Node, entries: list, steps: int) -> Optional[TunedStage]:
    """entries: [(Linear, w [N, K] the float weight quantized, QuantizedWeight by round to nearest)] of the stage.
    -> TunedStage, or None where the block cannot be tuned (see the module docstring)."""
    order = {n: i for i, n in enumerate(run.program.graph.nodes)}
    begin, end = order[run.cut], order[stage_end]
    block = [n for n in run.program.graph.nodes if begin <= order[n] < end]
    if any(begin > order[lin.node] or order[lin.node] >= end for lin, _, _ in entries):
        return None
    if any(n.op == "call_function" and getattr(n.target, "namespace", None) == "llmopt" for n in block):
        return None
    float_nodes = {n.name: n for n in reference.program.graph.nodes}
    if stage_end.name not in float_nodes:
        return None
    inside = set(block)
    outputs = [n for n in run.live_at(stage_end) if n in inside and n.name in float_nodes and _is_float(n)]
    if not outputs:
        return None
    reference.advance(float_nodes[stage_end.name])
    params = [LearnedRounding(w, qw) for _, w, qw in entries]

    def loss(chunk: int) -> torch.Tensor:
        got = run.segment(chunk, stage_end, {lin.weight: p.weight() for (lin, _, _), p in zip(entries, params)}, set(outputs))
        total = 0.0
        for n in outputs:
            target = reference.envs[chunk][float_nodes[n.name]].float()
            total = total + (got[n].float() - target).square().mean() / target.square().mean().clamp_min(1e-30)
        return total

    accepted, before, after = tune_rounding(params, loss, len(run.envs), steps)
    return TunedStage([(lin, p.quantized()) for (lin, _, _), p in zip(entries, params)], accepted, before, after)


def _is_float(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point
