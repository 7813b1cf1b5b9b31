"""CompiledModel.generate: greedy equals transformers' greedy, seeded sampling, eos, context limits, bad ids and
options refused by name."""
import pytest
import torch
from transformers import LlamaConfig

import llmopt
from llmopt.testing import build_model

EOS = 1


@pytest.fixture(scope="module")
def model_and_compiled():
    config = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=40, attention_dropout=0.0,
        bos_token_id=0, eos_token_id=EOS, pad_token_id=None,
    )
    model = build_model(config, seed=7)
    return model, llmopt.compile(model, backend="torch")


PROMPT = torch.tensor([[5, 9, 13, 2, 30], [7, 7, 21, 40, 3]])  # [2, 5]


def test_greedy_equals_transformers_greedy(model_and_compiled):
    model, cm = model_and_compiled
    with torch.no_grad():
        expected = model.generate(PROMPT, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=EOS)
    got = cm.generate(PROMPT, max_new_tokens=12)
    assert got.shape == (2, 17)
    assert torch.equal(got, expected)


def test_sampling_with_a_seeded_generator_is_reproducible(model_and_compiled):
    _, cm = model_and_compiled

    def sample(seed):
        return cm.generate(PROMPT, max_new_tokens=10, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(seed))

    first, again, other = sample(0), sample(0), sample(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # 20 draws at temperature 1.5 over 48 tokens: a tie is ~impossible
    assert torch.equal(first[:, :5], PROMPT)


def test_top_k_one_sampling_is_greedy(model_and_compiled):
    _, cm = model_and_compiled
    sampled = cm.generate(PROMPT, max_new_tokens=8, do_sample=True, top_k=1, temperature=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, cm.generate(PROMPT, max_new_tokens=8))


def test_eos_stops_each_sequence_and_pads_after_it(model_and_compiled):
    _, cm = model_and_compiled
    greedy = cm.generate(PROMPT, max_new_tokens=12)[:, 5:]  # [2, 12] the continuations
    eos = int(greedy[0, 3])
    stop = int((greedy[0] == eos).nonzero()[0])  # its first occurrence in row 0, at most 3
    assert eos not in greedy[1]  # row 1 never emits it, so it must run on to the end
    alone = cm.generate(PROMPT[:1], max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(alone[0, 5:], greedy[0, : stop + 1])  # up to and including eos, then stop

    both = cm.generate(PROMPT, max_new_tokens=12, eos_token_id=eos)[:, 5:]
    assert torch.equal(both[0, : stop + 1], greedy[0, : stop + 1])
    assert (both[0, stop + 1 :] == eos).all()  # a finished row is padded with eos
    assert torch.equal(both[1], greedy[1])


def test_prompt_longer_than_the_context_is_refused(model_and_compiled):
    _, cm = model_and_compiled
    too_long = torch.zeros(1, 41, dtype=torch.long)
    with pytest.raises(llmopt.LlmoptError, match="the prompt has 41 tokens but the model's context is 40"):
        cm(too_long)
    with pytest.raises(llmopt.LlmoptError, match=r"prompt \(41 tokens\) \+ max_new_tokens \(1\) exceeds the model's context of 40"):
        cm.generate(too_long, max_new_tokens=1)
    with pytest.raises(llmopt.LlmoptError, match=r"prompt \(30 tokens\) \+ max_new_tokens \(11\) exceeds"):
        cm.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=11)
    assert cm.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=10).shape == (1, 40)  # exactly fits


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1, 2, 48]]), r"input_ids holds token id 48, outside the model's vocabulary of 48 \(ids 0 to 47\)"),
    (torch.tensor([[1, -1, 3]]), r"input_ids holds token id -1, outside the model's vocabulary of 48"),
    (torch.zeros(2, 0, dtype=torch.long), r"input_ids \[2, 0\] holds no token: give at least one token a sequence"),
    (torch.ones(1, 4), r"input_ids must be integer token ids \[B, T\]; got torch.float32 \[1, 4\]"),
])
def test_bad_token_ids_are_refused_by_name(model_and_compiled, ids, message):
    _, cm = model_and_compiled
    with pytest.raises(llmopt.LlmoptError, match=message):
        cm(ids)
    with pytest.raises(llmopt.LlmoptError, match=message):
        cm.generate(ids, max_new_tokens=2)


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": -1}, r"max_new_tokens must be an integer >= 0; got -1"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be an integer >= 0; got 2.5"),
    ({"do_sample": True, "temperature": 0.0}, r"temperature must be > 0 when sampling \(got 0.0\)"),
    ({"do_sample": True, "top_p": 1.5}, r"top_p must lie in \(0, 1\] .*; got 1.5"),
    ({"do_sample": True, "top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
    ({"do_sample": True, "top_k": -2}, r"top_k must be an integer >= 1 \(or 0 / None for no top-k\); got -2"),
])
def test_bad_generate_options_are_refused_before_any_step(model_and_compiled, options, message):
    _, cm = model_and_compiled
    calls = []
    runner, cm._runner = cm._runner, lambda *args: calls.append(args) or runner(*args)
    try:
        with pytest.raises(llmopt.LlmoptError, match=message):
            cm.generate(PROMPT, **{"max_new_tokens": 3, **options})
    finally:
        cm._runner = runner
    assert calls == []  # refused before the prompt's forward pass


def test_zero_new_tokens_returns_the_prompt(model_and_compiled):
    _, cm = model_and_compiled
    assert torch.equal(cm.generate(PROMPT, max_new_tokens=0), PROMPT)


def test_prompts_of_different_lengths_in_a_list_are_refused_with_the_fix(model_and_compiled):
    _, cm = model_and_compiled
    with pytest.raises(llmopt.LlmoptError, match=r"rows of different lengths are padded to one length, or run one"):
        cm([[5, 9, 13], [7]])


def test_position_ids_broadcast_from_one_row(model_and_compiled):
    _, cm = model_and_compiled
    positions = torch.arange(3, 8)  # [T]: the prompt placed at positions 3..7
    expected = cm(PROMPT, positions.expand(2, 5))
    torch.testing.assert_close(cm(PROMPT, positions), expected, rtol=0, atol=0)
    torch.testing.assert_close(cm(PROMPT, positions[None]), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, cm(PROMPT))  # the positions reach the model


@pytest.mark.parametrize("positions, message", [
    (torch.arange(4), r"position_ids must be integer positions \[B, T\] .* matching input_ids \[2, 5\]; got torch.int64 \[1, 4\]"),
    (torch.arange(5.0), r"matching input_ids \[2, 5\]; got torch.float32 \[1, 5\]"),
    (torch.arange(5).expand(3, 5), r"got torch.int64 \[3, 5\]"),
    (torch.arange(36, 41), r"position_ids holds position 40, outside the model's context of 40 \(positions 0 to 39\)"),
    (torch.arange(-1, 4), r"position_ids holds position -1, outside the model's context of 40"),
])
def test_bad_position_ids_are_refused_by_name(model_and_compiled, positions, message):
    _, cm = model_and_compiled
    with pytest.raises(llmopt.LlmoptError, match=message):
        cm(PROMPT, positions)


def test_running_out_of_device_memory_names_the_fix_and_keeps_the_tokens_made(model_and_compiled):
    _, cm = model_and_compiled
    expected = cm.generate(PROMPT, max_new_tokens=3)  # [2, 8]
    runner, calls = cm._runner, []

    def fails_on_the_fourth_call(ids, positions):
        calls.append(ids.shape[1])
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return runner(ids, positions)

    cm._runner = fails_on_the_fourth_call
    try:
        with pytest.raises(llmopt.DeviceMemoryError, match=r"out of cpu memory running 2 sequences of 8 tokens \(CUDA out "
                                                           r"of memory. Tried to allocate 2.00 GiB\): run fewer sequences "
                                                           r"a call or shorter ones; the 3 tokens generated so far are in "
                                                           r"this error's .partial$") as caught:
            cm.generate(PROMPT, max_new_tokens=6)
        assert torch.equal(caught.value.partial, expected)
        calls.clear()
        with pytest.raises(llmopt.DeviceMemoryError, match=r"running 2 sequences of 5 tokens .*shorter ones$") as caught:
            for _ in range(4):
                cm(PROMPT)
        assert caught.value.partial is None
    finally:
        cm._runner = runner
