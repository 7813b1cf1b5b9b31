"""Runs a flat list of passes over a Program: verify at entry and after each pass, time and stats per
pass, and in debug mode an equivalence check of each exact pass that names the first one that breaks.

Entry point: `PassManager(passes, debug=False).run(program, calibration=None) -> Program`;
`manager.report` holds one `PassRecord` per pass.
"""
import time
from dataclasses import dataclass, field

import torch

from llmopt.calibration import Calibration
from llmopt.errors import DeviceMemoryError, EquivalenceError, PassError


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    stats: dict = field(default_factory=dict)


class PassManager:
    def __init__(self, passes, debug: bool = False, debug_inputs: torch.Tensor = None, tolerance: float = None):
        self.passes = list(passes)
        self.debug = debug
        self.debug_inputs = debug_inputs
        self.tolerance = tolerance
        self.report = []

    def run(self, program, calibration=None):
        _check_pass_list(self.passes, program, calibration)
        program.verify()
        for p in self.passes:
            p.check(program, calibration)  # refuse before anything changes
            before = program.copy() if self.debug and p.exact else None
            start = time.perf_counter()
            result = _run_pass(p, program, calibration)
            seconds = time.perf_counter() - start
            program = result.program
            program.verify()
            if before is not None:
                self._check_equivalent(p, before, program)
            self.report.append(PassRecord(p.name, seconds, result.changed, dict(result.stats)))
        return program

    def _check_equivalent(self, p, before, after):
        from llmopt.testing.equivalence import compare_programs

        ids = self.debug_inputs
        if ids is None:
            ids = torch.randint(0, after.vocab_size(), (2, 16), generator=torch.Generator().manual_seed(0)).to(after.device)
        tol = self.tolerance if self.tolerance is not None else (1e-4 if after.dtype_ == torch.float32 else 2e-2)
        mismatch = compare_programs(before, after, ids, rtol=tol, atol=tol)
        if mismatch is not None:
            raise EquivalenceError(f"exact pass {p.name} changed the model's function: {mismatch}")


def _run_pass(p, program, calibration):
    """p(program, calibration); running out of device memory becomes a DeviceMemoryError naming the pass and the fix."""
    try:
        return p(program, calibration)
    except torch.OutOfMemoryError as err:
        raise DeviceMemoryError(
            f"{p.name} ran out of {program.device.type} memory ({str(err).splitlines()[0]}): calibrate in smaller "
            "batches (llmopt.Calibration(ids, batch_size=2)) or on fewer or shorter sequences, or free the memory "
            "other tensors hold"
        ) from err


def _check_pass_list(passes, program, calibration):
    """Refuse an impossible list before any pass runs: non-passes, missing calibration, a pass whose
    required pass is neither applied already nor earlier in the list, a once-only pass twice, a pass that
    needs float linears after one that quantizes them, a calibration set that does not fit the model."""
    from llmopt.passes_api import Pass, quantized_linears

    applied = [step["pass"] for step in program.recipe]
    quantized_by = quantized_linears(program)
    if calibration is not None and any(isinstance(p, Pass) and p.needs_calibration for p in passes):
        Calibration.coerce(calibration).check_fits(program)
    for i, p in enumerate(passes):
        if not isinstance(p, Pass):
            raise PassError(f"pass #{i} is {p!r}, not an llmopt Pass: build it, e.g. Smooth(alpha=0.5), not Smooth")
        later = tuple(q.name for q in passes[i + 1 :] if isinstance(q, Pass))
        problem = p.refusal(applied, calibration, later=later, quantized_by=quantized_by)
        if problem:
            raise PassError(problem)
        applied.append(p.name)
        if p.quantizes and not quantized_by:
            quantized_by = f"{p.name}, earlier in the pass list,"
