"""Learned rounding (SignRound, Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent").

Entry points: `LearnedRounding(w, qw)`, one quantized weight whose rounding and group scales can be tuned,
and `tune_rounding(params, loss, batches, steps, lr)`, the signed-gradient loop with its acceptance check.

Round to nearest (and GPTQ) choose each code by the weight's own error or the layer's output error; what
the model loses is the error of whole blocks through their non-linear parts (softmax, SiLU·up, the norm
after). SignRound learns, per weight, an offset v in [-0.5, 0.5] added before rounding, and per group a
multiplier a in [0.5, 1.5] of the scale (the zero point stays), by signed gradient descent on a block's
output error with the straight-through estimator for the rounding:

    q = clamp(round(w / (a·s) + v) + z, 0, 2^bits - 1),   ŵ = (q - z) · a·s

v = 0 and a = 1 give the codes and scales the tuning started from (round to nearest under the searched clip).
Weights that are exactly zero (pruned) keep v = 0, so they stay exactly zero. The loop keeps the tuned values
only if the mean loss over the check batches fell; otherwise every weight keeps its start.
"""
from typing import Callable, Sequence

import torch

from llmopt.passes.compress.rtn import QuantizedWeight

STEPS = 50  # signed-gradient steps per block (AutoRound: 200; on the reference model 50 closed 75% of RTN's gap at w4)
LR = 5e-3  # step size, decayed linearly to 0 (AutoRound's 1 / 200)
OFFSET_BOUND = 0.5  # |v| <= 0.5: a code moves by at most one step from round to nearest
SCALE_BOUNDS = (0.5, 1.5)


class LearnedRounding:
    """The tunable quantization of one weight, started from `qw` (its codes must be round-to-nearest's of `w`
    under `qw`'s scales and zero points for v = 0 to reproduce it)."""

    def __init__(self, w: torch.Tensor, qw: QuantizedWeight):
        n, k = w.shape
        self.dtype, self.bits, self.group_size, self.symmetric = w.dtype, qw.bits, qw.group_size, qw.symmetric
        self.w = w.float().reshape(n, k // qw.group_size, qw.group_size)  # [N, ng, G]
        self.scale = qw.scales.float().unsqueeze(-1)  # [N, ng, 1]
        self.zero = qw.zeros.float().unsqueeze(-1)  # [N, ng, 1]
        self.free = self.w != 0  # [N, ng, G]: pruned weights keep v = 0
        self.offset = torch.zeros_like(self.w, requires_grad=True)  # v: [N, ng, G]
        self.multiplier = torch.ones_like(self.scale, requires_grad=True)  # a: [N, ng, 1]

    def weight(self) -> torch.Tensor:
        """-> ŵ [N, K] in the weight's dtype, differentiable in v and a (straight-through rounding)."""
        scale = self.scale * self.multiplier
        r = self._shifted(scale)
        q = (r + (torch.round(r) - r).detach() + self.zero).clamp(0, 2**self.bits - 1)
        return ((q - self.zero) * scale).reshape(self.w.shape[0], -1).to(self.dtype)

    def _shifted(self, scale: torch.Tensor) -> torch.Tensor:
        """w / scale + v: [N, ng, G], what is rounded to give a code (before the zero point)."""
        return self.w / scale + self.offset * self.free

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One signed-gradient step on v and a (a parameter without a gradient does not move)."""
        for p, (lo, hi) in ((self.offset, (-OFFSET_BOUND, OFFSET_BOUND)), (self.multiplier, SCALE_BOUNDS)):
            if p.grad is not None:
                p.sub_(lr * p.grad.sign()).clamp_(lo, hi)
                p.grad = None

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the start, v = 0 and a = 1 (round to nearest under the searched scales)."""
        self.offset.zero_()
        self.multiplier.fill_(1.0)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """-> the `linear_wq` layout of the current v and a: the scale is rounded to the weight's dtype first and
        the codes are taken under the stored scale, so `.dequantize()` is what the op computes."""
        scale = (self.scale * self.multiplier).to(self.dtype).float().clamp_min(torch.finfo(self.dtype).tiny)
        codes = self._shifted(scale).round().add(self.zero).clamp(0, 2**self.bits - 1)
        return QuantizedWeight.from_codes(codes.reshape(self.w.shape[0], -1), scale.squeeze(-1).to(self.dtype),
                                          self.zero.squeeze(-1).to(self.dtype), self.bits, self.group_size, self.symmetric)


def tune_rounding(
    params: Sequence[LearnedRounding],
    loss: Callable[[int], torch.Tensor],  # batch index -> scalar loss of the block with the params' current weights
    batches: int,
    steps: int = STEPS,
    lr: float = LR,
    check: int = 2,
    seed: int = 0,
) -> tuple:
    """Signed gradient descent on `loss` over random batches; -> (accepted, loss before, loss after), the
    losses being means over the first `check` batches. Not accepted: every param is reset to its start."""
    if batches < 1:
        raise ValueError("tune_rounding: no calibration batches to tune on")
    checked = range(min(check, batches))
    before = _mean_loss(loss, checked)
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        loss(int(torch.randint(batches, (1,), generator=gen))).backward()
        for p in params:
            p.step(lr * (1 - i / steps))
    after = _mean_loss(loss, checked)
    accepted = after < before
    if not accepted:
        for p in params:
            p.reset()
    return accepted, before, after


@torch.no_grad()
def _mean_loss(loss, batches) -> float:
    return sum(float(loss(b)) for b in batches) / len(batches)
