"""`RTN(bits=4, group_size=128, symmetric=False, include_lm_head=False)`: round-to-nearest group
quantization of every linear into `torch.ops.llmopt.linear_wq` (the canonical layout of
`llmopt/ops/linear_wq.py`). Lossy; needs no calibration.

Also what the other lossy passes (AWQ, W8A8, SmoothQuant, Wanda, MagnitudePrune) share:
- `linear_targets(program, include_lm_head)`: the float `aten.linear` nodes a lossy pass
  rewrites: all but the lm head (unless asked) and LoRA's low-rank A/B linears, which stay in float
  so that an adapter over a quantized base runs unmerged (int4 base + 16-bit low-rank branch);
- `check_format`, `check_finite`, `check_group_quantizable`, `checked_calibration`: PassErrors naming the layer
  and the fix, for `check()`, so that bad input is refused before anything changes (`all_finite`:
  the NaN/Inf test they and AWQ's calibration use);
- `to_linear_wq(program, lin, qw)`: turns an `aten.linear` node into `linear_wq` in place (the same
  fx node, so references to it stay valid).

Zeros stay zero: a zero weight is coded as its group's integer zero point (2^(bits-1) when symmetric)
and dequantizes to exactly 0, so a pruned weight (2:4 included) keeps its pattern when quantized.
"""
import torch

from llmopt.calibration import Calibration
from llmopt.errors import PassError
from llmopt.passes.compress.rtn import SUPPORTED_BITS, check_quantizable, quantize_groups
from llmopt.passes.merge_lora_quantized import lora_branch_linears
from llmopt.passes_api import Pass, PassResult


def linear_targets(program, include_lm_head: bool) -> list:
    """[Linear]: the float linears to rewrite (a Program whose linears are already quantized is refused earlier, by
    `Pass.refusal`, for every pass that declares `rewrites_float_linears`)."""
    head = program.lm_head()
    branch = lora_branch_linears(program)
    return [
        lin for lin in program.linears()
        if lin.kind == "dense" and lin.node not in branch and (include_lm_head or head is None or lin.node is not head.node)
    ]


def check_format(bits: int, group_size: int, who: str) -> None:
    """PassError unless bits is one linear_wq stores and group_size a positive integer (at construction, not at run)."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise PassError(f"{who}: bits={bits!r} is not supported; use one of {SUPPORTED_BITS} (linear_wq's layouts)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise PassError(f"{who}: group_size={group_size!r} must be a positive integer that divides each linear's input "
                        "width (128 is usual; 32 or 64 keep more accuracy)")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t` (one aminmax pass, which propagates NaN: 4x cheaper than isfinite().all())."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(program, targets, who: str) -> None:
    for lin in targets:
        for part, node in (("weight", lin.weight), ("bias", lin.bias)):
            if node is not None and not all_finite(program.get_weight(node)):
                bad = int((~torch.isfinite(program.get_weight(node))).sum())
                raise PassError(
                    f"{who}: the {part} of layer {lin.name} has {bad} NaN/Inf values; fix the checkpoint (or the "
                    f"pass or dtype cast that produced them) before {who}"
                )


def check_group_quantizable(program, targets, bits: int, group_size: int, who: str) -> None:
    for lin in targets:
        try:
            check_quantizable(program.get_weight(lin.weight), bits, group_size, None, f"{who} on layer {lin.name}")
        except ValueError as err:
            raise PassError(str(err)) from err


def checked_calibration(calibration, who: str):
    """Calibration.coerce, refusing a calibration set without a token."""
    calibration = Calibration.coerce(calibration)
    if calibration is not None and not any(t.numel() for t in calibration.batches):
        raise PassError(f"{who}: the calibration set is empty; pass token ids [N, T] with N, T >= 1 (llmopt.data.calibration_batches)")
    return calibration


def to_linear_wq(program, lin, qw) -> None:
    """Rewrite `lin` (an aten.linear) as linear_wq(x, qweight, scales, zeros, bias, group_size, bits)."""
    name = lin.weight.meta.get("weight_name", lin.weight.target)
    qweight = program.add_weight(f"{lin.weight.target}_q", qw.qweight, like=lin.weight, weight_name=name)
    scales = program.add_weight(f"{lin.weight.target}_scales", qw.scales, like=qweight, weight_name=f"{lin.name}.scales")
    zeros = program.add_weight(f"{lin.weight.target}_zeros", qw.zeros, like=scales, weight_name=f"{lin.name}.zeros")
    lin.node.target = torch.ops.llmopt.linear_wq.default
    lin.node.args = (lin.input, qweight, scales, zeros, lin.bias, qw.group_size, qw.bits)
    lin.node.kwargs = {}


class RTN(Pass):
    """Round-to-nearest group quantization of every linear; see the module docstring."""

    exact = False
    once = True
    quantizes = True
    rewrites_float_linears = True

    def __init__(self, bits: int = 4, group_size: int = 128, symmetric: bool = False, include_lm_head: bool = False):
        check_format(bits, group_size, "RTN")
        self.bits, self.group_size, self.symmetric, self.include_lm_head = bits, group_size, symmetric, include_lm_head

    def check(self, program, calibration):
        super().check(program, calibration)
        targets = linear_targets(program, self.include_lm_head)
        check_finite(program, targets, self.name)
        check_group_quantizable(program, targets, self.bits, self.group_size, self.name)

    def apply(self, program, calibration):
        targets = linear_targets(program, self.include_lm_head)
        for lin in targets:
            qw = quantize_groups(program.get_weight(lin.weight), self.bits, self.group_size, symmetric=self.symmetric)
            to_linear_wq(program, lin, qw)
        program.remove_unused_weights()
        program.recompile()
        return PassResult(program, bool(targets), {"linears_quantized": len(targets)})
