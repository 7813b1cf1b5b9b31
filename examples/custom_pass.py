"""A custom exact pass written with `llmopt.Pattern`: drop multiplications by 1.0.

Entry point: `RemoveMulByOne()`, a `llmopt.Pass`. Run this file to apply it to a tiny Llama:

    python examples/custom_pass.py

Captured RoPE models scale cos and sin by `attention_scaling`, which is 1.0 for default RoPE, so
every captured Llama carries two `mul(x, 1.0)` nodes that cost a pass over memory each.
"""
import torch
from transformers import LlamaConfig

import llmopt
from llmopt.testing import build_model
from llmopt.testing.equivalence import assert_equivalent

aten = torch.ops.aten


def times_one(x):
    """The pattern, written with the ATen ops a captured graph holds. Its literal matches any scalar."""
    return aten.mul.Tensor(x, 1.0)


def unchanged(x):
    """The replacement: same arguments as the pattern, traced and spliced in (here: just x)."""
    return x


def is_exact_identity(program, match) -> bool:
    """Rewrite only a real `* 1.0` that keeps the dtype (int_tensor * 1.0 is a float tensor)."""
    x = match.inputs["x"]
    return match.literal("mul", 1) == 1.0 and program.dtype(x) == program.dtype(match.output)


class RemoveMulByOne(llmopt.Pass):
    """Replace `x * 1.0` by `x`. Exact: `debug=True` in `llmopt.compile` checks it on every run."""

    exact = True

    def apply(self, program, calibration) -> llmopt.PassResult:
        removed = llmopt.Pattern(times_one, unchanged, extra_check=is_exact_identity).apply(program)
        return llmopt.PassResult(program, changed=removed > 0, stats={"mul_by_one_removed": removed})


def main():
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )
    model = build_model(config, seed=0)
    cm = llmopt.compile(model, passes=[RemoveMulByOne()], backend="torch", debug=True)
    print(cm.report())
    input_ids = torch.randint(0, config.vocab_size, (2, 16))  # [B, T]
    assert_equivalent(cm, model, input_ids, rtol=1e-5, atol=1e-5)  # fp32, same ops less two no-ops
    print("equivalent to the eager model: yes")


if __name__ == "__main__":
    main()
