"""Function-preserving activation-outlier injection, to test outlier-sensitive methods on small models.

Entry point: `inject_outliers(model_or_program, channels=6, factor=30, seed=0) -> Program`.

Large LLMs carry a few activation channels hundreds of times larger than the rest at their linears'
inputs; small trained models (the reference model: max/median ≈ 7) do not. For each norm that feeds
linears (found from the graph by `llmopt.producers.input_groups`, kind 'norm'), `channels` channels
chosen at random get their scale (`weight + offset`, so Gemma's `1 + w` too; and the bias) multiplied
by `factor`, and the matching input columns of every linear the norm feeds are divided by `factor`.
The function is unchanged up to float rounding; the norm's output now has outlier channels.
The final norm feeding only the lm head is left alone (the lm head is not an input group).
"""
import torch

from llmopt.producers import fold_scales, input_groups


def inject_outliers(model_or_program, channels: int = 6, factor: float = 30.0, seed: int = 0):
    """A new Program (a transformers model is captured first; a Program is copied, never changed)."""
    from llmopt.capture import capture
    from llmopt.program import Program

    program = model_or_program.copy() if isinstance(model_or_program, Program) else capture(model_or_program)
    generator = torch.Generator().manual_seed(seed)
    for group in input_groups(program):
        if group.kind != "norm":
            continue
        width = program.get_weight(group.norm.weight).shape[0]  # [C]
        s = torch.ones(width)
        s[torch.randperm(width, generator=generator)[:channels]] = 1.0 / factor
        fold_scales(program, group, s)  # norm scale / s (× factor on the chosen channels), consumer columns × s
    program.recompile()
    return program
