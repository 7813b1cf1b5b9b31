"""`W8A8(activations, include_lm_head)` and `SmoothQuant(alpha, ...)`: int8 weights and int8 activations
through `torch.ops.llmopt.linear_w8a8`. Lossy.

W8A8 rewrites every float linear (the lm head only when asked; LoRA's A/B linears stay in float):
int8 weight, symmetric, one scale per output channel (`compress.quantize_weight_per_channel`), and
- activations="per_token": activations quantized at run time, one scale per token (no calibration);
- activations="per_tensor_static": one scale per linear input, max|x| / 127 over the calibration tokens.

SmoothQuant = Smooth(alpha) then W8A8, as one pass: for every norm and the linears it feeds,
s_j = max|X_j|^α / max|W_:j|^(1-α) is folded exactly (norm weight / s, weight columns · s), then the
linears are quantized. Statistics are gathered once, before anything changes: the static scales after
smoothing follow from them, max|X_j / s_j| = max|X_j| / s_j. alpha="search" picks α per norm group
from `grid` by the W8A8 output error on calibration rows (`compress.search_smooth_alpha`, which
models per-token activations; the applied s uses max|X_j| over all tokens, the search that of its rows).
"""
import torch

from llmopt.errors import PassError
from llmopt.passes.compress.w8a8 import (
    DEFAULT_ALPHAS,
    MAX_TOKENS,
    quantize_weight_per_channel,
    search_smooth_alpha,
    smooth_scales,
    static_act_scale,
)
from llmopt.passes.rtn import check_finite, checked_calibration, linear_targets
from llmopt.passes_api import Pass, PassResult
from llmopt.producers import fold_scales, input_groups

ACTIVATIONS = ("per_token", "per_tensor_static")


def to_linear_w8a8(program, lin, act_scale) -> None:
    """Rewrite `lin` (an aten.linear) as linear_w8a8(x, q8 [N, K], scale [N], bias, act_scale)."""
    q, scale = quantize_weight_per_channel(program.get_weight(lin.weight))
    name = lin.weight.meta.get("weight_name", lin.weight.target)
    qweight = program.add_weight(f"{lin.weight.target}_int8", q, like=lin.weight, weight_name=name)
    wscale = program.add_weight(f"{lin.weight.target}_scale", scale, like=qweight, weight_name=f"{lin.name}.weight_scale")
    lin.node.target = torch.ops.llmopt.linear_w8a8.default
    lin.node.args = (lin.input, qweight, wscale, lin.bias, act_scale)
    lin.node.kwargs = {}


def quantize_w8a8(program, targets, act_absmax: dict = None) -> None:
    """Rewrite `targets`; with `act_absmax` ({input node: [K] max|x|}) activation scales are static."""
    act_scales = {}
    for lin in targets:
        if act_absmax is not None and lin.input not in act_scales:
            scale = static_act_scale(act_absmax[lin.input])  # [1]
            name = f"{lin.name}.input_scale"
            act_scales[lin.input] = program.add_weight(f"{lin.weight.target}_act_scale", scale, like=lin.weight, weight_name=name)
        to_linear_w8a8(program, lin, act_scales.get(lin.input))
    program.remove_unused_weights()
    program.recompile()


def _check_activations(activations: str, who: str) -> None:
    if activations not in ACTIVATIONS:
        raise PassError(f"{who}: activations={activations!r} must be one of {ACTIVATIONS}")


class W8A8(Pass):
    """int8 weight x int8 activation linears; see the module docstring."""

    exact = False
    once = True
    quantizes = True
    rewrites_float_linears = True

    def __init__(self, activations: str = "per_token", include_lm_head: bool = False):
        _check_activations(activations, "W8A8")
        self.activations, self.include_lm_head = activations, include_lm_head

    @property
    def needs_calibration(self) -> bool:
        return self.activations == "per_tensor_static"

    def check(self, program, calibration):
        super().check(program, checked_calibration(calibration, self.name) if self.needs_calibration else calibration)
        check_finite(program, linear_targets(program, self.include_lm_head), self.name)

    def apply(self, program, calibration):
        targets = linear_targets(program, self.include_lm_head)
        absmax = None
        if self.needs_calibration:
            stats = checked_calibration(calibration, self.name).statistics(program, {lin.input for lin in targets})
            absmax = {node: s.absmax for node, s in stats.items()}
        quantize_w8a8(program, targets, absmax)
        return PassResult(program, bool(targets), {"linears_w8a8": len(targets)})


class SmoothQuant(Pass):
    """Smoothing-scale migration then W8A8, as one pass; see the module docstring."""

    exact = False
    needs_calibration = True
    once = True
    quantizes = True
    rewrites_float_linears = True

    def __init__(self, alpha=0.5, activations: str = "per_token", include_lm_head: bool = False, grid=DEFAULT_ALPHAS):
        if alpha != "search" and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise PassError(f"SmoothQuant: alpha={alpha!r} must lie in [0, 1] (0.5 is SmoothQuant's default) or be 'search'")
        _check_activations(activations, "SmoothQuant")
        self.alpha = alpha if alpha == "search" else float(alpha)
        self.activations, self.include_lm_head, self.grid = activations, include_lm_head, tuple(grid)

    def check(self, program, calibration):
        super().check(program, checked_calibration(calibration, self.name))
        check_finite(program, linear_targets(program, self.include_lm_head), self.name)

    def apply(self, program, calibration):
        calibration = checked_calibration(calibration, self.name)
        targets = linear_targets(program, self.include_lm_head)
        quantized = {lin.node for lin in targets}
        groups = [
            g for g in input_groups(program, self.include_lm_head)
            if g.kind == "norm" and any(c.node in quantized for c in g.consumers)
        ]
        stats = calibration.statistics(program, {lin.input for lin in targets})
        rows = calibration.samples(program, [g.value for g in groups], MAX_TOKENS) if self.alpha == "search" else {}
        absmax = {node: s.absmax for node, s in stats.items()}
        weights = [[program.get_weight(c.weight) for c in g.consumers if c.node in quantized] for g in groups]
        alphas = [search_smooth_alpha(rows[g.value], w, self.grid) if rows else self.alpha for g, w in zip(groups, weights)]
        for g, w, alpha in zip(groups, weights, alphas):  # the Program changes from here on, nothing fails
            s = smooth_scales(absmax[g.value], w, alpha)  # [K]
            fold_scales(program, g, s)
            absmax[g.value] = absmax[g.value] / s
        quantize_w8a8(program, targets, absmax if self.activations == "per_tensor_static" else None)
        stats = {"norms_smoothed": len(groups), "linears_w8a8": len(targets), "alphas": alphas}
        return PassResult(program, bool(targets), stats)
