"""`Wanda(sparsity=0.5, pattern="unstructured"|"N:M")` and `MagnitudePrune(sparsity, pattern)`: zero the
least important weights of every float linear (not the lm head unless asked, not LoRA's A/B). Lossy.

Importance: |W| (magnitude) or |W[n, j]|·‖X_j‖₂ (Wanda, with ‖X_j‖₂ over the calibration tokens from
one calibrator run; all layers are scored on the unpruned model). Masks come from
`compress.prune_mask`: per output row for "unstructured", N zeros in every M consecutive inputs for
"N:M" ("2:4" and "4:8" are NVIDIA's semi-structured patterns). The linears stay `aten.linear` with new
weight tensors (the originals are not written to) and carry `node.meta["sparsity"] = pattern`, for
lowerings that use sparse kernels (torch's semi-structured 2:4 on GPUs).

Quantizing afterwards keeps the zeros (RTN/AWQ/W8A8 dequantize a zero weight to exactly 0), so the
pattern survives; the `sparsity` meta stays on the quantized node and still describes its weight.
"""
import re

from llmopt.errors import PassError
from llmopt.passes.compress.prune import magnitude_scores, prune_mask, wanda_scores
from llmopt.passes.rtn import check_finite, checked_calibration, linear_targets
from llmopt.passes_api import Pass, PassResult

_NM = re.compile(r"^(\d+):(\d+)$")


def _check_pattern(sparsity: float, pattern: str, who: str) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise PassError(f"{who}: sparsity={sparsity!r} must lie strictly between 0 and 1 (0.5 = half the weights zeroed)")
    if pattern == "unstructured":
        return
    nm = _NM.match(pattern) if isinstance(pattern, str) else None
    if nm is None or not 0 < int(nm.group(1)) < int(nm.group(2)):
        raise PassError(f"{who}: pattern={pattern!r} must be 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4' or '4:8'")
    n, m = int(nm.group(1)), int(nm.group(2))
    if abs(sparsity - n / m) > 1e-9:
        raise PassError(f"{who}: pattern {pattern!r} zeroes {n} of every {m} weights; pass sparsity={n / m:g} with it")


class _Prune(Pass):
    exact = False
    once = True
    rewrites_float_linears = True

    def __init__(self, sparsity: float = 0.5, pattern: str = "unstructured", include_lm_head: bool = False):
        _check_pattern(sparsity, pattern, self.name)
        self.sparsity, self.pattern, self.include_lm_head = float(sparsity), pattern, include_lm_head

    def check(self, program, calibration):
        super().check(program, checked_calibration(calibration, self.name) if self.needs_calibration else calibration)
        targets = linear_targets(program, self.include_lm_head)
        check_finite(program, targets, self.name)
        m = int(self.pattern.split(":")[1]) if self.pattern != "unstructured" else 1
        for lin in targets:
            k = program.get_weight(lin.weight).shape[1]
            if k % m:
                raise PassError(
                    f"{self.name}: pattern {self.pattern!r} needs M={m} to divide the input dim of layer {lin.name} "
                    f"(K={k}); use 'unstructured' or another N:M"
                )

    def scores(self, program, targets, calibration) -> dict:
        """{linear node: importance [N, K]}."""
        raise NotImplementedError

    def apply(self, program, calibration):
        targets = linear_targets(program, self.include_lm_head)
        scores = self.scores(program, targets, calibration)
        zeros = 0
        for lin in targets:
            w = program.get_weight(lin.weight)
            keep = prune_mask(scores[lin.node], None if self.pattern != "unstructured" else self.sparsity, self.pattern)
            program.set_weight(lin.weight, w.masked_fill(~keep, 0))
            lin.node.meta["sparsity"] = self.pattern
            zeros += int((~keep).sum())
        total = sum(program.get_weight(lin.weight).numel() for lin in targets)
        return PassResult(program, bool(targets), {"linears_pruned": len(targets), "sparsity": zeros / max(total, 1)})


class MagnitudePrune(_Prune):
    """Zero the smallest |W|; see the module docstring."""

    def scores(self, program, targets, calibration):
        return {lin.node: magnitude_scores(program.get_weight(lin.weight)) for lin in targets}


class Wanda(_Prune):
    """Zero the smallest |W|·‖X‖₂ (Sun et al. 2023); see the module docstring."""

    needs_calibration = True

    def scores(self, program, targets, calibration):
        stats = checked_calibration(calibration, self.name).statistics(program, {lin.input for lin in targets})
        return {lin.node: wanda_scores(program.get_weight(lin.weight), stats[lin.input].l2) for lin in targets}
