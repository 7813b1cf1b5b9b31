"""Equivalence checks for modules, Programs and compiled models.

Entry points: `assert_equivalent(a, b, inputs, rtol, atol)` (raises `EquivalenceError`; when both
sides are Programs the message names the first diverging node) and `compare_programs(a, b, inputs)`
(returns None or a description of the first mismatch).
"""
import torch

from llmopt.errors import EquivalenceError


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] from a Program, a CompiledModel or a transformers model."""
    from llmopt.compiled import CompiledModel
    from llmopt.program import Program

    if isinstance(model, (Program, CompiledModel)):
        return model(input_ids)
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False) if hasattr(model, "config") else model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def assert_equivalent(a, b, inputs: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-4):
    """Raise EquivalenceError unless a(inputs) ≈ b(inputs) elementwise (|x-y| <= atol + rtol·|y|)."""
    from llmopt.program import Program

    if isinstance(a, Program) and isinstance(b, Program):
        mismatch = compare_programs(a, b, inputs, rtol, atol)
        if mismatch is not None:
            raise EquivalenceError(mismatch)
        return
    x, y = logits_of(a, inputs), logits_of(b, inputs)
    problem = _mismatch(x, y, rtol, atol)
    if problem:
        raise EquivalenceError(f"outputs differ: {problem}")


def compare_programs(a, b, inputs, rtol=1e-4, atol=1e-4):
    """None when the outputs agree; else where they first diverge (by node name, in a's order)."""
    values_a, values_b = _node_values(a, inputs), _node_values(b, inputs)
    out_problem = _mismatch(a.run(inputs), b.run(inputs), rtol, atol)
    if not out_problem:
        return None
    for name, va in values_a.items():
        vb = values_b.get(name)
        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape and va.is_floating_point():
            problem = _mismatch(va, vb, rtol, atol)
            if problem:
                return f"outputs differ ({out_problem}); first diverging node: {name} ({problem})"
    return f"outputs differ ({out_problem}); every node both graphs share agrees, so the difference is in nodes only one of them has"


def _node_values(program, inputs) -> dict:
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function":
                values[n.name] = out
            return out

    pos = torch.arange(inputs.shape[-1], device=inputs.device).expand_as(inputs)
    with torch.no_grad():
        Recorder(program.gm).run(inputs, pos)
    return values


def _mismatch(x: torch.Tensor, y: torch.Tensor, rtol, atol) -> str:
    if x.shape != y.shape:
        return f"shapes {list(x.shape)} vs {list(y.shape)}"
    x, y = x.double(), y.double()
    if torch.isnan(x).any() != torch.isnan(y).any() or (torch.isnan(x).any() and not torch.equal(torch.isnan(x), torch.isnan(y))):
        return "NaN in one side only"
    bad = (x - y).abs() > atol + rtol * y.abs()
    if bad.any():
        err = (x - y).abs().max().item()
        return f"{int(bad.sum())} of {bad.numel()} elements out of tolerance (rtol={rtol}, atol={atol}); max abs error {err:.3g}"
    return ""
