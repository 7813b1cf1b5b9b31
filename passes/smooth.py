"""`Smooth(alpha=0.5)`: SmoothQuant's smoothing-scale migration. Exact (the function is kept).

For each norm and the linears it feeds (found by `llmopt.producers`, from the graph alone), with
calibration statistics at their shared input X:
    s_j = max|X_j|^α / max_i max_k |W_ik_j|^(1-α)
the norm's weight (and bias) is divided by s and every consumer's input column j multiplied by s_j;
all consumers of one norm share s. Activation outliers move into the weights, where 8-bit
quantization handles them per output channel.
"""
from llmopt.errors import PassError
from llmopt.passes_api import Pass, PassResult
from llmopt.producers import fold_scales, input_groups
from llmopt.passes.compress.w8a8 import smooth_scales


class Smooth(Pass):
    needs_calibration = True
    once = True
    rewrites_float_linears = True

    def __init__(self, alpha: float = 0.5):
        if not 0.0 <= float(alpha) <= 1.0:
            raise PassError(f"Smooth: alpha={alpha} must lie in [0, 1] (0.5 is SmoothQuant's default; 0.75-0.85 for models with strong outliers)")
        self.alpha = float(alpha)

    def apply(self, program, calibration):
        groups = [g for g in input_groups(program) if g.kind == "norm"]
        stats = calibration.statistics(program, [g.value for g in groups])
        for g in groups:
            weights = [program.get_weight(c.weight) for c in g.consumers]
            s = smooth_scales(stats[g.value].absmax, weights, self.alpha)
            fold_scales(program, g, s)
        return PassResult(program, bool(groups), {"norms_smoothed": len(groups), "linears_smoothed": sum(len(g.consumers) for g in groups)})
