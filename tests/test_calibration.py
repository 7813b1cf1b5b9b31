"""The calibrator's per-channel statistics equal those computed on the activations themselves."""
import pytest
import torch
from transformers import LlamaConfig

import llmopt
from llmopt.calibration import Calibration
from llmopt.producers import input_groups
from llmopt.testing import build_model

BATCHES = [  # two lengths, and 3 rows with batch_size 2: chunks of 2 and 1
    torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(0)),
    torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1)),
]


@pytest.fixture(scope="module")
def model_and_program():
    config = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention_dropout=0.0,
    )
    model = build_model(config, seed=6)
    return model, llmopt.capture(model)


def eager_inputs(model, module_names) -> dict:
    """{module name: [tokens, K]} every input the eager model feeds those linears over BATCHES."""
    seen = {name: [] for name in module_names}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for name in module_names
    ]
    with torch.no_grad():
        for ids in BATCHES:
            model(ids)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


def test_statistics_equal_those_of_the_activations(model_and_program):
    model, program = model_and_program
    groups = input_groups(program)  # norm outputs, attention outputs, SiLU·up products
    stats = Calibration(BATCHES, batch_size=2, progress=False).statistics(program, [g.value for g in groups])
    activations = eager_inputs(model, [g.consumers[0].name for g in groups])
    assert len(stats) == len(groups) == 8
    for g in groups:
        x, s = activations[g.consumers[0].name].double(), stats[g.value]  # x: [tokens, K]
        assert s.count == x.shape[0] == 3 * 9 + 2 * 5
        torch.testing.assert_close(s.absmax.double(), x.abs().amax(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.abssum, x.abs().sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.absmean.double(), x.abs().mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.sumsq, (x**2).sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.l2.double(), x.norm(dim=0), rtol=1e-6, atol=1e-6)


def test_samples_are_rows_of_the_activations(model_and_program):
    model, program = model_and_program
    group = input_groups(program)[0]
    rows = Calibration(BATCHES, batch_size=2, progress=False).samples(program, [group.value], max_rows=6)[group.value]
    activations = eager_inputs(model, [group.consumers[0].name])[group.consumers[0].name]
    assert rows.shape == (6, 32)  # 6 rows / 3 chunks: 2 from each chunk
    distance = torch.cdist(rows.double(), activations.double()).amin(dim=1)  # [6]: to the nearest real row
    assert (distance < 1e-5).all()


def test_nan_activations_name_the_node(model_and_program):
    _, captured = model_and_program
    program = captured.copy()
    embedding = program.embeddings()[0]
    table = program.get_weight(embedding.weight).clone()
    table[BATCHES[0][0, 3]] = float("nan")  # one token's embedding
    program.set_weight(embedding.weight, table)
    first = input_groups(program)[0].value
    with pytest.raises(llmopt.PassError, match=f"calibration activations at node {first.name} contain NaN or Inf"):
        Calibration(BATCHES, progress=False).statistics(program, [first])


@pytest.mark.parametrize("bad, message", [
    ([], "a LongTensor \\[N, T\\] of token ids or a non-empty list of them"),
    ([torch.zeros(2, 3, dtype=torch.long), [1, 2, 3]], "a LongTensor \\[N, T\\] of token ids or a non-empty list"),
    (torch.rand(2, 8), "non-empty integer token ids \\[N, T\\]; got torch.float32 \\[2, 8\\]"),
    (torch.zeros(2, 3, 4, dtype=torch.long), "got torch.int64 \\[2, 3, 4\\]"),
    (torch.zeros(0, 4, dtype=torch.long), "non-empty integer token ids \\[N, T\\]; got torch.int64 \\[0, 4\\]"),
])
def test_coerce_refuses_what_is_not_token_ids(bad, message):
    with pytest.raises(llmopt.PassError, match=message):
        Calibration.coerce(bad)


def test_coerce_accepts_tensors_lists_and_calibrations():
    assert Calibration.coerce(None) is None
    calibration = Calibration.coerce(torch.arange(6))  # one sequence [T]
    assert [b.shape for b in calibration.batches] == [(1, 6)]
    assert Calibration.coerce(calibration) is calibration
    mixed = Calibration.coerce([torch.zeros(2, 4, dtype=torch.int32), torch.ones(3, 7, dtype=torch.long)])
    assert [tuple(b.shape) for b in mixed.batches] == [(2, 4), (3, 7)]
