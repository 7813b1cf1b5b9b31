"""The check a kernel built on young compiler features passes once before it is used.

Entry point: `passes_first_use_check(label, where, run, ref, tol, baseline, fallback, stacklevel) -> bool`. Gluon's
API and Triton's automatic passes move between releases, so `flash_attention_hopper` and `w4a16_direct` run their
kernel once on a small odd case against a baseline: a failure to compile or launch, or a relative error of tol or
more (NaN included), warns, naming the kernel, the GPU and Triton version (`where`) and what runs instead, and the
caller keeps the answer so the kernel is never tried again for that case.
"""
import warnings

import torch


def passes_first_use_check(label: str, where: str, run, ref: torch.Tensor, tol: float, baseline: str, fallback: str,
                           stacklevel: int) -> bool:
    """run: () -> the kernel's output; ref: the baseline's (fp32). stacklevel: as warnings.warn's, from the caller."""
    try:  # another Triton may not compile it
        out = run().float()
    except Exception as err:  # noqa: BLE001  (any compile or launch failure means: do not use this path)
        detail = (str(err).strip().splitlines() or [""])[-1][:200]  # Triton's last line names the failure
        warnings.warn(f"llmopt: the {label} failed {where}: {type(err).__name__}: {detail}; {fallback}.",
                      RuntimeWarning, stacklevel=stacklevel + 1)
        return False
    err = ((out - ref).norm() / ref.norm()).item()
    if not err < tol:  # catches NaN too
        warnings.warn(f"llmopt: the {label} gives a relative error of {err:.2e} against the {baseline} {where}; "
                      f"{fallback}.", RuntimeWarning, stacklevel=stacklevel + 1)
        return False
    return True
