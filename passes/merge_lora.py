"""`MergeLoRA()`: fold LoRA branches into their base weights, W' = W + scale·(B @ A). Exact.

The LoRA computation is found as a graph pattern, not by module type, so any module structure that
computes it (peft's included) is merged: a linear and a low-rank pair of linears on the same input,
the pair's output scaled by a constant, added to the linear's output.
"""
import torch

from llmopt.passes_api import Pass, PassResult
from llmopt.pattern import Pattern

aten = torch.ops.aten


def lora(x, w, a, b):
    return aten.add.Tensor(aten.linear.default(x, w), aten.mul.Tensor(aten.linear.default(aten.linear.default(x, a), b), 1.0))


def lora_with_bias(x, w, bias, a, b):
    return aten.add.Tensor(aten.linear.default(x, w, bias), aten.mul.Tensor(aten.linear.default(aten.linear.default(x, a), b), 1.0))


def _low_rank_weights(program, match) -> bool:
    """The pair must be weights with A: [r, K], B: [N, r], r < min(N, K), W a weight of [N, K], and the
    scale a constant (a branch scaled by a tensor is not a LoRA branch to merge)."""
    w, a, b = (match.inputs[k] for k in ("w", "a", "b"))
    if any(n.op != "get_attr" for n in (w, a, b)):
        return False
    (n, k), (r, k2), (n2, r2) = (program.get_weight(x).shape for x in (w, a, b))
    constant_scale = isinstance(match.literal("mul", 1), (int, float))
    return k == k2 and n == n2 and r == r2 and r < min(n, k) and constant_scale


def _merged_linear(program, match):
    w, a, b = (match.inputs[k] for k in ("w", "a", "b"))
    scale = match.literal("mul", 1)
    weight = program.get_weight(w)
    delta = scale * (program.get_weight(b).float() @ program.get_weight(a).float())  # [N, K]
    merged = program.add_weight(w.target + "_merged", (weight.float() + delta).to(weight.dtype), like=w, weight_name=w.meta.get("weight_name"))
    args = (match.inputs["x"], merged) + ((match.inputs["bias"],) if "bias" in match.inputs else ())
    return program.graph.call_function(aten.linear.default, args)


class MergeLoRA(Pass):
    """Fold every LoRA branch into its base weight."""

    rewrites_float_linears = True  # after a quantizer its bases are quantized: MergeLoRAQuantized merges those

    def apply(self, program, calibration):
        merged = 0
        for fn in (lora_with_bias, lora):
            merged += Pattern(fn, _merged_linear, extra_check=_low_rank_weights, name="lora").apply(program)
        return PassResult(program, merged > 0, {"lora_merged": merged})
