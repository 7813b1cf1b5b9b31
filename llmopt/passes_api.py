"""The pass interface: `Pass`, `PassResult`, and what a pass may ask for.

Entry point: subclass `Pass` and implement `apply(program, calibration) -> PassResult`.

A pass declares
- `exact`: whether it keeps the function (the pass manager's debug mode checks it),
- `needs_calibration`: the pass manager refuses to run it without a calibration set,
- `requires`: names of passes that must have run before it (`Program.recipe` records what ran),
- `once`: whether applying it twice is an error,
- `quantizes`: whether it turns the float linears into quantized ones (`llmopt.linear_w8a8`, `linear_wq`),
- `rewrites_float_linears`: whether it needs float linear weights to rewrite, so it must run before any pass
  that quantizes them (Smooth folds scales into them, pruning zeroes them, every quantizer reads them),
and gets `check(program, calibration)` called before anything changes, to refuse with a `PassError`
that names the pass, the node and the fix.
"""
from dataclasses import dataclass, field

from llmopt.errors import PassError


@dataclass
class PassResult:
    program: object  # the Program after the pass
    changed: bool
    stats: dict = field(default_factory=dict)  # named counters, e.g. {"lora_merged": 14}


class Pass:
    """Base class of every pass; see the module docstring."""

    exact: bool = True
    needs_calibration: bool = False
    requires: tuple = ()
    once: bool = False
    quantizes: bool = False
    rewrites_float_linears: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def options(self) -> dict:
        """The pass's options, as recorded in the Program's recipe (and saved with it)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def check(self, program, calibration) -> None:
        """Refuse before anything changes: missing calibration, missing earlier pass, applied twice, float
        linears needed but already quantized."""
        problem = self.refusal([step["pass"] for step in program.recipe], calibration,
                               quantized_by=quantized_linears(program))
        if problem:
            raise PassError(problem)

    def refusal(self, applied: list, calibration, later: tuple = (), quantized_by: str = "") -> str:
        """Why this pass cannot run after the passes named in `applied` ('' when it can); `later`
        names the passes after it in a list, for the hint; `quantized_by` says what quantized the linears
        before it ('' when nothing has)."""
        if self.needs_calibration and calibration is None:
            return f"{self.name} needs calibration data: pass calibration=<LongTensor [N, T] of token ids> (see llmopt.data.calibration_batches)"
        for needed in self.requires:
            if needed not in applied:
                hint = f"move {needed} before {self.name}" if needed in later else f"add {needed}(...) before {self.name}"
                return f"{self.name} needs {needed} to run before it: {hint} in the pass list"
        if self.once and self.name in applied:
            return f"{self.name} appears twice (or was already applied); applying it twice would compound its changes"
        if self.rewrites_float_linears and quantized_by:
            return (f"{self.name} needs float linears, but {quantized_by} quantized them: apply {self.name} to the "
                    "float model, before any quantization pass (e.g. [Wanda(0.5), Smooth(0.5), W8A8()], not the "
                    "other way round)")
        return ""

    def apply(self, program, calibration) -> PassResult:
        raise NotImplementedError

    def __call__(self, program, calibration=None) -> PassResult:
        self.check(program, calibration)
        result = self.apply(program, calibration)
        result.program.recipe.append({"pass": self.name, "options": self.options()})
        return result

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"


def quantized_linears(program) -> str:
    """'' when every linear of `program` is float, else who quantized them, for a refusal's text."""
    if all(lin.kind == "dense" for lin in program.linears()):
        return ""
    return f"the passes already applied ({', '.join(step['pass'] for step in program.recipe) or 'none recorded'})"
