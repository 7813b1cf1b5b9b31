"""The Program IR: roles per family, symbolic shapes, dtypes, the verifier, dump, dtype moves, copies."""
import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

import llmopt
from llmopt.testing import FAMILIES, build_model, config_strategy

# Per family: (linears per layer, embedding tables). Every family has two norms a layer plus a final
# norm, one attention a layer, and an lm head. Phi-3 and GPT-NeoX fuse q/k/v (and Phi-3 gate/up) into
# one linear; GPT-2 and OPT learn a position table next to the token table.
LAYOUT = {
    "llama": (7, 1), "mistral": (7, 1), "qwen2": (7, 1), "gemma": (7, 1),
    "phi3": (4, 1), "gpt2": (4, 2), "opt": (6, 2), "gpt_neox": (4, 1),
}


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_roles_per_family(family, data):
    config = data.draw(config_strategy(family))
    program = llmopt.capture(build_model(config))
    layers = config.num_hidden_layers
    per_layer, tables = LAYOUT[family]
    assert len(program.linears()) == per_layer * layers + 1
    assert len(program.norms()) == 2 * layers + 1
    assert len(program.attentions()) == layers
    assert len(program.embeddings()) == tables
    head = program.lm_head()
    assert head is not None and program.shape(head.node)[-1] == config.vocab_size
    assert program.get_weight(head.weight).shape == (config.vocab_size, config.hidden_size)
    assert all(lin.kind == "dense" for lin in program.linears())


@pytest.fixture(scope="module")
def captured():
    config = LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False,
    )
    return llmopt.capture(build_model(config, seed=2))


@pytest.fixture
def program(captured):
    return captured.copy()


def ids(batch=2, length=5, vocab=61, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_shape_gives_sympy_symbols_for_batch_and_tokens(program):
    input_ids = program.nodes("placeholder")[0]
    batch, tokens = program.shape(input_ids)
    assert isinstance(batch, sympy.Symbol) and isinstance(tokens, sympy.Symbol) and batch != tokens
    assert program.shape(program.lm_head().node) == (batch, tokens, 61)  # the same symbols reach the logits
    assert program.shape(program.embeddings()[0].weight) == (61, 32)  # weights are static
    assert program.dtype(input_ids) == torch.int64
    assert program.dtype(program.lm_head().node) == torch.float32 and program.dtype_ == torch.float32


def test_shape_of_a_non_tensor_node_is_a_verify_error(program):
    size = next(n for n in program.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.sym_size.int)
    with pytest.raises(llmopt.VerifyError, match=size.name):
        program.shape(size)


def python_function(x):
    return x * 2


def test_verify_rejects_a_python_function_node(program):
    head = program.lm_head().node
    with program.graph.inserting_after(head):
        bad = program.graph.call_function(python_function, (head,))
    head.replace_all_uses_with(bad)
    bad.args = (head,)
    with pytest.raises(llmopt.VerifyError, match=f"node {bad.name} calls .*python_function.*neither an ATen nor an llmopt op"):
        program.verify()


def test_verify_rejects_a_read_of_a_missing_weight(program):
    embedding = program.embeddings()[0]
    with program.graph.inserting_before(embedding.node), pytest.warns(UserWarning, match="no underlying reference"):
        missing = program.graph.get_attr("no_such_weight")
    embedding.node.replace_input_with(embedding.weight, missing)
    with pytest.raises(llmopt.VerifyError, match=f"{missing.name}.*no_such_weight"):
        program.verify()


def test_verify_rejects_inconsistent_shapes(program):
    head = program.lm_head()
    program.set_weight(head.weight, torch.zeros(61, 16))  # the hidden size is 32
    with pytest.raises(llmopt.VerifyError, match=f"node {head.node.name}"):
        program.verify()


def test_shapes_are_derived_again_only_after_a_change(program, monkeypatch):
    """recompile() then verify() (what every pass and the pass manager do) derives the shapes once; a graph edit
    or a weight of another dtype derives them again."""
    from llmopt import program as program_module

    runs = []
    run = program_module._FakePropagation.run
    monkeypatch.setattr(program_module._FakePropagation, "run", lambda self, *a: runs.append(1) or run(self, *a))
    program.recompile()
    program.verify()
    assert len(runs) == 1  # a copy's shapes are derived afresh, once
    before = len(runs)
    head = program.lm_head()
    program.set_weight(head.weight, program.get_weight(head.weight).half())
    program.verify()
    assert len(runs) == before + 1 and program.shape(head.weight) == tuple(program.get_weight(head.weight).shape)
    assert head.weight.meta["val"].dtype == torch.float16
    with program.graph.inserting_after(head.node):
        doubled = program.graph.call_function(torch.ops.aten.mul.Tensor, (head.node, 2.0))
    head.node.replace_all_uses_with(doubled)
    doubled.args = (head.node, 2.0)
    program.recompile()
    program.verify()
    assert len(runs) == before + 2 and doubled.meta["val"].dtype == torch.float32


def test_an_edit_derives_again_only_the_nodes_it_reaches(program, monkeypatch):
    """Shapes are re-derived incrementally: a node whose inputs kept their values is not run, and a node whose value
    keeps its shape, strides and dtype stops the change; a change of shape runs on to the logits."""
    computed = []
    run_node = torch.fx.Interpreter.run_node
    monkeypatch.setattr(torch.fx.Interpreter, "run_node",
                        lambda self, n: (n.op == "call_function" and computed.append(n)) or run_node(self, n))
    program.recompile()
    computed.clear()
    first = program.linears()[0].node  # a q/k/v projection, read by a view
    with program.graph.inserting_after(first):
        doubled = program.graph.call_function(torch.ops.aten.mul.Tensor, (first, 2.0))
    first.replace_all_uses_with(doubled)
    doubled.args = (first, 2.0)
    program.recompile()
    # the new mul and its users (their input changed), whose values keep their kind: nothing after them runs
    assert computed[0] is doubled and set(computed[1:]) == set(doubled.users) and len(doubled.users) < 3
    computed.clear()
    head = program.lm_head()
    vocab = program.get_weight(head.weight).shape[0]
    program.set_weight(head.weight, torch.zeros(vocab + 3, program.get_weight(head.weight).shape[1]))
    program.recompile()
    assert head.node in computed and doubled not in computed
    output = next(iter(program.nodes("output")))
    assert all(program.shape(n)[-1] == vocab + 3 for n in output.all_input_nodes if n.meta["val"].dim() == 3)
    assert program.run(ids()).shape[-1] == vocab + 3


def test_dump_lists_nodes_with_roles_shapes_and_dtypes(program):
    text = program.dump()
    assert len(text.splitlines()) == len(program.graph.nodes)
    for role, count in (("linear", 7), ("lm_head", 1), ("norm", 3), ("attention", 1), ("embedding", 1)):
        assert text.count(f"[{role}]") == count, role
    head_line = next(line for line in text.splitlines() if "[lm_head]" in line)
    assert head_line.startswith(program.lm_head().node.name) and "float32[" in head_line


def test_to_float16_runs_close_to_float32(program):
    expected = program.run(ids())  # [2, 5, V]
    half = program.to(dtype=torch.float16)
    got = half.run(ids())
    assert got.dtype == torch.float16 and half.dtype_ == torch.float16
    assert all(t.dtype == torch.float16 for name, t in half.weights().items() if "inv_freq" not in name)
    # fp16 weights and activations: ~1e-3 relative per op over one layer; logits are O(1)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_to_float16_keeps_rope_accurate_at_late_positions():
    """A Program moved to fp16 should be as accurate as the fp16 model captured directly, which keeps
    RoPE (inv_freq, position angles) and the RMSNorm statistics in fp32 as transformers does."""
    config = LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, attention_dropout=0.0,
    )
    program = llmopt.capture(build_model(config, seed=2))
    position_ids = torch.arange(1000, 1016).expand(2, 16)  # fp16 spaces integers near 1000 by 0.5
    expected = program.run(ids(length=16), position_ids)
    direct = llmopt.capture(build_model(config, seed=2, dtype=torch.float16)).run(ids(length=16), position_ids)
    moved = program.to(dtype=torch.float16).run(ids(length=16), position_ids)
    torch.testing.assert_close(direct.float(), expected, rtol=2e-2, atol=2e-2)  # fp16 rounding only
    torch.testing.assert_close(moved.float(), expected, rtol=2e-2, atol=2e-2)


def test_copy_is_independent(program):
    before = program.run(ids())
    twin = program.copy()
    head = twin.lm_head()
    twin.set_weight(head.weight, twin.get_weight(head.weight) * 2)
    twin.graph.erase_node(twin.add_weight("unused", torch.ones(3)))
    twin.recipe.append({"pass": "Edited", "options": {}})
    torch.testing.assert_close(program.run(ids()), before, rtol=0, atol=0)
    torch.testing.assert_close(twin.run(ids()), before * 2, rtol=1e-6, atol=1e-6)  # the head is linear, no bias
    assert len(program.graph.nodes) == len(twin.graph.nodes) and not program.recipe
    assert not hasattr(program.gm, "unused")
