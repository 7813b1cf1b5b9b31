"""The pattern API: PyTorch functions matched on a graph, extra_check filters, traced and callable replacements."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from transformers import LlamaConfig

import llmopt
from llmopt import Pattern, Program
from llmopt.testing import build_model

aten = torch.ops.aten


def toy(x, y):
    a = x * 1.0
    b = y * 2.0
    c = (a + b) * 3.0 * 0.5
    return (torch.relu(c) * 1.0,)


@pytest.fixture
def toy_program():
    """An ATen graph with symbolic shapes: mul by 1.0 twice, by 2.0 once, then a chain *3.0*0.5."""
    return Program(make_fx(toy, tracing_mode="symbolic")(torch.randn(3, 4), torch.randn(3, 4)))


def run_toy(program, x, y):
    return program.gm(x, y)[0]


def times_one(x):
    return aten.mul.Tensor(x, 1.0)


def same(x):
    return x


def literal_is_one(program, match):
    return match.literal("mul", 1) == 1.0


def two_scalings(x):
    return aten.mul.Tensor(aten.mul.Tensor(x, 3.0), 0.5)


def one_scaling(program, match):
    """Callable replacement: one mul by the product of the two literals the match found."""
    first, second = match.literal("mul_tensor", 1), match.literal("mul_tensor_1", 1)
    return program.graph.call_function(aten.mul.Tensor, (match.inputs["x"], first * second))


def count(program, target, literal=None) -> int:
    return sum(n.target == target and (literal is None or n.args[-1] == literal) for n in program.nodes("call_function"))


def test_literals_match_any_scalar_and_extra_check_filters(toy_program):
    unchecked = Pattern(times_one, same).matches(toy_program)
    assert len(unchecked) == 5  # every scalar mul: x*1, y*2, *3, *0.5, relu*1
    checked = Pattern(times_one, same, extra_check=literal_is_one).matches(toy_program)
    assert [m.literal("mul", 1) for m in checked] == [1.0, 1.0]
    assert {m.inputs["x"].name for m in checked} == {"x_1", "relu"}


def test_traced_replacement_rewrites_every_match(toy_program):
    x, y = torch.randn(2, 5), torch.randn(2, 5)
    expected = toy(x, y)[0]
    rewrites = Pattern(times_one, same, extra_check=literal_is_one).apply(toy_program)
    assert rewrites == 2
    assert count(toy_program, aten.mul.Tensor, 1.0) == 0 and count(toy_program, aten.mul.Tensor, 2.0) == 1
    torch.testing.assert_close(run_toy(toy_program, x, y), expected, rtol=0, atol=0)  # x*1.0 == x exactly
    assert Pattern(times_one, same, extra_check=literal_is_one).apply(toy_program) == 0  # nothing left


def test_chained_matches_are_all_rewritten():
    """In (x * 1.0) * 1.0 the outer match's input is the inner match's output, which the first rewrite
    replaces: the second rewrite must read the replacement, not resurrect the replaced node."""
    program = Program(make_fx(lambda x: ((x * 1.0) * 1.0 + 2,), tracing_mode="symbolic")(torch.randn(3, 4)))
    rewrites = Pattern(times_one, same, extra_check=literal_is_one).apply(program)
    assert rewrites == 2
    assert count(program, aten.mul.Tensor) == 0, str(program.graph)


def test_callable_replacement_builds_new_nodes(toy_program):
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    expected = toy(x, y)[0]
    assert Pattern(two_scalings, one_scaling).apply(toy_program) == 1
    assert count(toy_program, aten.mul.Tensor, 1.5) == 1 and count(toy_program, aten.mul.Tensor, 3.0) == 0
    torch.testing.assert_close(run_toy(toy_program, x, y), expected, rtol=1e-6, atol=1e-6)


def test_match_node_names_an_ambiguous_node_in_its_error(toy_program):
    match = Pattern(two_scalings, one_scaling).matches(toy_program)[0]
    with pytest.raises(KeyError, match="'mul' is not unique or absent; names: \\['mul_tensor', 'mul_tensor_1'\\]"):
        match.node("mul")


@pytest.fixture(scope="module")
def captured():
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False,
    )
    return llmopt.capture(build_model(config, seed=4))


INPUT_IDS = torch.arange(14).view(2, 7)


def silu(a):
    return aten.silu.default(a)


def silu_by_sigmoid(a):
    return aten.mul.Tensor(a, aten.sigmoid.default(a))


def test_traced_replacement_on_a_captured_model(captured):
    program = captured.copy()
    expected = program.run(INPUT_IDS)
    assert Pattern(silu, silu_by_sigmoid).apply(program) == 2  # one SiLU per MLP, two layers
    assert count(program, aten.silu.default) == 0 and count(program, aten.sigmoid.default) == 2
    program.verify()
    torch.testing.assert_close(program.run(INPUT_IDS), expected, rtol=1e-5, atol=1e-5)  # silu(a) = a·σ(a) in fp32


def test_extra_check_on_a_captured_model_sees_the_program(captured):
    program = captured.copy()
    # RoPE scales cos and sin by attention_scaling, 1.0 for default RoPE
    assert len(Pattern(times_one, same, extra_check=literal_is_one).matches(program)) == 2
    integer_only = Pattern(times_one, same, extra_check=lambda prog, m: prog.dtype(m.output) == torch.int64)
    assert integer_only.matches(program) == []  # no scalar mul of an integer tensor in this graph


def bias_free_linear(x, w):
    return aten.linear.default(x, w)


def doubled_weight_halved_output(program, match):
    """Callable replacement that computes a new weight: linear(x, 2W) * 0.5 (exact: powers of two)."""
    w = match.inputs["w"]
    doubled = program.add_weight(w.target + "_x2", program.get_weight(w) * 2, like=w)
    linear = program.graph.call_function(aten.linear.default, (match.inputs["x"], doubled))
    return program.graph.call_function(aten.mul.Tensor, (linear, 0.5))


def weight_is_square(program, match):
    w = match.inputs["w"]
    return w.op == "get_attr" and program.get_weight(w).shape[0] == program.get_weight(w).shape[1]


def test_callable_replacement_with_new_weights_on_a_captured_model(captured):
    program = captured.copy()
    expected, weight_bytes = program.run(INPUT_IDS), program.parameter_bytes()
    square = [lin for lin in program.linears() if program.get_weight(lin.weight).shape[0] == program.get_weight(lin.weight).shape[1]]
    assert len(square) == 8  # q, k, v, o of two layers (32 x 32)
    rewrites = Pattern(bias_free_linear, doubled_weight_halved_output, extra_check=weight_is_square).apply(program)
    assert rewrites == len(square)
    assert sum(name.endswith("_x2") for name in program.weights()) == len(square)
    assert program.parameter_bytes() == weight_bytes  # the old weights went with their last reader
    program.verify()
    torch.testing.assert_close(program.run(INPUT_IDS), expected, rtol=0, atol=0)
