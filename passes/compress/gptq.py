"""GPTQ rounding (Frantar et al. 2023) under fixed group scales and zero points.

Entry point: `gptq_quantize(w, x, bits, group_size, symmetric, clip_ratio, damp)` -> `QuantizedWeight`,
the same layout, scales and zero points as `quantize_groups(w, bits, group_size, symmetric,
clip_ratio)`; only the integer codes differ. Round-to-nearest rounds every weight on its own; GPTQ
rounds the input columns one at a time and moves each column's rounding error onto the columns not
yet rounded, through the inverse of the calibration inputs' Gram matrix H = xᵀx / n, so that the
layer's output error on x, ‖x (Ŵ - W)ᵀ‖², is what the codes minimize column by column (the
"static groups" form: the groups' ranges are fixed before rounding, here by AWQ's clip search).

With a diagonal H (uncorrelated inputs) no error moves and the codes are round-to-nearest's exactly.
`damp` adds that fraction of H's mean diagonal to its diagonal (GPTQ's 1%), which keeps the Cholesky
factorization defined when x has fewer rows than K or dead input channels.

On CUDA each block of 128 columns is rounded by one Triton launch (`gptq_block.round_block`) instead of
a dozen torch ops a column, which were most of GPTQ's time on the H200 (RESULTS.md: AWQ with GPTQ
rounding of a 7B shape).
"""
from typing import Optional

import torch

from llmopt.passes.compress.rtn import QuantizedWeight, check_quantizable, group_scale_zero, quantize_codes

BLOCK = 128  # columns rounded per step before the rest of W is updated at once


def gptq_quantize(
    w: torch.Tensor,  # [N, K] float
    x: torch.Tensor,  # [n, K] calibration inputs, as the linear sees them
    bits: int,
    group_size: int,
    symmetric: bool = False,
    clip_ratio: Optional[torch.Tensor] = None,  # as for quantize_groups
    damp: float = 0.01,
) -> QuantizedWeight:
    """Group quantization of `w` with GPTQ's error-feedback rounding on the inputs `x`; see the module docstring."""
    check_quantizable(w, bits, group_size, clip_ratio, "gptq_quantize")
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k or x.shape[0] == 0:
        raise ValueError(f"gptq_quantize: inputs must be [n >= 1, K={k}], got {tuple(x.shape)}")
    if not damp > 0:
        raise ValueError(f"gptq_quantize: damp={damp} must be > 0 (GPTQ uses 0.01)")
    wg = w.float().reshape(n, k // group_size, group_size)  # [N, ng, G]
    scale, zero = group_scale_zero(wg, bits, symmetric, clip_ratio, w.dtype)  # [N, ng, 1] each
    scale, zero = scale.squeeze(-1), zero.squeeze(-1)  # [N, ng] each
    u = _inverse_hessian_factor(x, damp)  # [K, K] upper triangular
    codes = _round_columns(w.float().clone(), u, scale, zero, bits, group_size, kernel=w.is_cuda)  # [N, K]
    return QuantizedWeight.from_codes(codes, scale.to(w.dtype), zero.to(w.dtype), bits, group_size, symmetric)


def _inverse_hessian_factor(x: torch.Tensor, damp: float) -> torch.Tensor:
    """x: [n, K] -> U: [K, K], the upper Cholesky factor of (xᵀx / n + damp·mean diag·I)⁻¹."""
    xf = x.float()
    h = xf.t() @ xf / xf.shape[0]  # [K, K]
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0  # a dead input: its weight's error costs nothing; keep H invertible
    diag += damp * diag.mean()
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(f"gptq_quantize: the calibration inputs' Gram matrix is not positive definite at damp={damp}; raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _round_columns(w, u, scale, zero, bits: int, group_size: int, kernel: bool = False) -> torch.Tensor:
    """w: [N, K] fp32 (updated in place), u: [K, K], scale/zero: [N, K // G] -> codes [N, K] fp32,
    each column rounded as `quantize_codes` rounds (so a diagonal H gives RTN's codes). `kernel`: each
    block's column loop in one Triton launch (`gptq_block.round_block`) instead of a dozen torch ops a column."""
    codes = torch.empty_like(w)
    k = w.shape[1]
    if kernel:
        from llmopt.passes.compress.gptq_block import round_block

        groups = (torch.arange(k, device=w.device) // group_size).to(torch.int32)  # [K]
        scale, zero, u = scale.float().contiguous(), zero.float().contiguous(), u.contiguous()  # the kernel reads rows
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        if kernel:
            codes[:, b0:b1], errs = round_block(w[:, b0:b1], u[b0:b1, b0:b1], scale, zero, groups[b0:b1], bits)
        else:
            errs = torch.empty(w.shape[0], b1 - b0, dtype=w.dtype, device=w.device)  # [N, b1 - b0]
            for j in range(b0, b1):
                s, z = scale[:, j // group_size], zero[:, j // group_size]  # [N] each
                q = quantize_codes(w[:, j], s, z, bits)  # [N]
                codes[:, j] = q
                err = (w[:, j] - (q - z) * s) / u[j, j]  # [N]
                w[:, j:b1] -= err[:, None] * u[j, j:b1][None, :]
                errs[:, j - b0] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    return codes
