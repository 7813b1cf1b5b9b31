"""`MergeLoRAQuantized(on_quantized="requantize"|"refuse")`: LoRA branches over group-quantized bases (QLoRA).

The pattern is MergeLoRA's with a `linear_wq` base: an int4/int3/int8 linear and a low-rank pair of
float linears on the same input, the pair's output scaled by a constant, added to the base's output.
- "requantize": dequantize the base, merge W' = deq(W) + scale·(B @ A) in fp32, requantize with the
  base's bits and group size (`compress.requantize_merged`); lossy, so the stats report the relative
  error the requantization adds, ‖deq(Q(W')) - W'‖ / ‖W'‖ (max and mean over the merged layers).
- "refuse": a PassError naming the layers, raised in `check()` before anything changes.
Left alone, an adapter over a quantized base runs unmerged: the int4 linear plus the 16-bit low-rank
branch (the quantizing passes leave LoRA's A/B linears in float; see `lora_branch_linears`).

The base's symmetry is read from its zero points: symmetric when every zero is 2^(bits-1), the
symmetric convention of `compress.rtn`; then the merge is requantized symmetric too.
"""
import torch

from llmopt.errors import PassError
from llmopt.passes.compress.lora import requantize_merged
from llmopt.passes.compress.rtn import QuantizedWeight
from llmopt.passes.merge_lora import _low_rank_weights, lora, lora_with_bias
from llmopt.passes_api import Pass, PassResult
from llmopt.pattern import Pattern

aten = torch.ops.aten
ON_QUANTIZED = ("requantize", "refuse")


def lora_wq(x, qweight, scales, zeros, a, b):
    # literals (bias None, group size, bits) match any value: the base's own are read from the match
    base = torch.ops.llmopt.linear_wq.default(x, qweight, scales, zeros, None, 128, 4)
    return aten.add.Tensor(base, aten.mul.Tensor(aten.linear.default(aten.linear.default(x, a), b), 1.0))


def _low_rank_over_wq(program, match) -> bool:
    """A: [r, K], B: [N, r] weights with r < min(N, K), the base [N, K] by its scales [N, K // G]."""
    qweight, scales, a, b = (match.inputs[k] for k in ("qweight", "scales", "a", "b"))
    if any(n.op != "get_attr" for n in (qweight, scales, a, b)):
        return False
    n = program.get_weight(scales).shape[0]
    (r, k), (n2, r2) = program.get_weight(a).shape, program.get_weight(b).shape
    return n == n2 and r == r2 and r < min(n, k)


def _match_only(program, match):
    """Replacement of patterns used for matching only (never applied)."""
    raise AssertionError("a match-only pattern was applied")


def quantized_lora_matches(program) -> list:
    return Pattern(lora_wq, _match_only, extra_check=_low_rank_over_wq, name="lora_wq").matches(program)


def lora_branch_linears(program) -> set:
    """The A and B linear nodes of every LoRA branch, over a float or a quantized base."""
    matches = quantized_lora_matches(program)
    for fn in (lora_with_bias, lora):
        matches += Pattern(fn, _match_only, extra_check=_low_rank_weights, name="lora").matches(program)
    branch = set()
    for m in matches:
        pair = (m.inputs["a"], m.inputs["b"])
        branch |= {n for n in m.nodes.values() if n.target == aten.linear.default and n.args[1] in pair}
    return branch


def _base_name(match) -> str:
    return match.inputs["qweight"].meta.get("weight_name", match.inputs["qweight"].target).removesuffix(".weight")


def _merge_requantized(program, match, errors: list):
    """Replacement: a linear_wq of the requantized merged weight; appends the added error to `errors`."""
    base = next(n for n in match.nodes.values() if n.target == torch.ops.llmopt.linear_wq.default)
    x, qweight, scales, zeros, bias, group_size, bits = base.args
    scale = match.literal("mul", 1)  # a constant: checked in MergeLoRAQuantized.check
    zeros_t = program.get_weight(zeros)
    qw = QuantizedWeight(program.get_weight(qweight), program.get_weight(scales), zeros_t, bits, group_size,
                         symmetric=bool((zeros_t == 2 ** (bits - 1)).all()))
    a, b = (program.get_weight(match.inputs[k]) for k in ("a", "b"))
    merged, added_error = requantize_merged(qw, a, b, float(scale))
    errors.append(added_error)
    name = qweight.meta.get("weight_name", qweight.target)
    new = [program.add_weight(f"{qweight.target}_merged", merged.qweight, like=qweight, weight_name=name)]
    for part, tensor, like in (("scales", merged.scales, scales), ("zeros", merged.zeros, zeros)):
        new.append(program.add_weight(f"{like.target}_merged", tensor, like=like, weight_name=f"{_base_name(match)}.{part}"))
    return program.graph.call_function(torch.ops.llmopt.linear_wq.default, (x, *new, bias, group_size, bits))


class MergeLoRAQuantized(Pass):
    """Merge (requantizing) or refuse LoRA branches over `linear_wq` bases; see the module docstring."""

    exact = False

    def __init__(self, on_quantized: str = "requantize"):
        if on_quantized not in ON_QUANTIZED:
            raise PassError(f"MergeLoRAQuantized: on_quantized={on_quantized!r} must be one of {ON_QUANTIZED}")
        self.on_quantized = on_quantized

    def check(self, program, calibration):
        super().check(program, calibration)
        matches = quantized_lora_matches(program)
        for m in matches:
            if not isinstance(m.literal("mul", 1), (int, float)):
                raise PassError(
                    f"MergeLoRAQuantized: the LoRA scale at node {m.node('mul').name} (on {_base_name(m)}) is not a "
                    "constant, so the branch can't be folded into a weight; leave the adapter unmerged"
                )
        if self.on_quantized == "refuse" and matches:
            names = ", ".join(_base_name(m) for m in matches)
            raise PassError(
                f"MergeLoRAQuantized: LoRA adapters sit on quantized bases ({names}); merging them requantizes the "
                "base and adds error. Use MergeLoRAQuantized(on_quantized='requantize') to accept that (the stats "
                "report the added error), keep the adapters unmerged (they run as is), or merge before quantizing "
                "(MergeLoRA() before RTN/AWQ)"
            )

    def apply(self, program, calibration):
        if self.on_quantized == "refuse":
            return PassResult(program, False, {"lora_merged": 0})
        errors = []
        merge = Pattern(lora_wq, lambda p, m: _merge_requantized(p, m, errors), extra_check=_low_rank_over_wq, name="lora_wq")
        merged = merge.apply(program)
        stats = {"lora_merged": merged}
        if errors:
            stats.update(requantize_rel_error_max=max(errors), requantize_rel_error_mean=sum(errors) / len(errors))
        return PassResult(program, merged > 0, stats)
