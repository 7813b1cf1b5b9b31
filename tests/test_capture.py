"""capture(model) computes what the model computes: every family, any batch and length, ragged positions.

Capture and eager run the same fp32 ATen ops in the same order, so they agree to rounding (1e-5).
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaConfig
from transformers.modeling_outputs import CausalLMOutput

import llmopt
from llmopt.testing import FAMILIES, build_model, config_strategy, input_ids_strategy
from llmopt.testing.configs import MAX_POSITIONS

CAPTURE_EXAMPLE_LENGTH = 8  # capture traces a [2, 8] batch when given no example inputs


def token_list(vocab, length):
    return st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length)


def eager_logits(model, input_ids, position_ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_capture_matches_eager_for_any_batch_and_length(family, data):
    config = data.draw(config_strategy(family))
    model = build_model(config, seed=data.draw(st.integers(0, 2**16)))
    program = llmopt.capture(model)
    single_token = data.draw(input_ids_strategy(config.vocab_size, max_batch=3, max_len=1))  # a decode step's shape
    drawn = data.draw(input_ids_strategy(config.vocab_size, max_batch=3, max_len=40))
    longer = torch.tensor([data.draw(token_list(config.vocab_size, CAPTURE_EXAMPLE_LENGTH + 5))])  # [1, 13]
    for input_ids in (single_token, drawn, longer):
        batch, length = input_ids.shape
        start = data.draw(st.integers(0, MAX_POSITIONS - length))  # a later chunk of a sequence
        position_ids = torch.arange(start, start + length).expand(batch, length)
        got = program.run(input_ids, position_ids)  # [B, T, V]
        assert got.shape == (batch, length, config.vocab_size)
        torch.testing.assert_close(got, eager_logits(model, input_ids, position_ids), rtol=1e-5, atol=1e-5)


def test_reference_model_captures_and_matches(shared, reference_model):
    model, program = reference_model  # from_pretrained, then llmopt.capture: once a session (tests/conftest.py)
    tokenizer = AutoTokenizer.from_pretrained(shared / "models" / "ref-llama-12m")
    text = ["The king spoke to the people of the city about the war.", "It was a dark and stormy night; the rain fell."]
    input_ids = torch.tensor([ids[:10] for ids in tokenizer(text)["input_ids"]])  # [2, 10]
    assert program.max_seq_len == model.config.max_position_embeddings
    assert len(program.linears()) == 7 * model.config.num_hidden_layers + 1
    torch.testing.assert_close(program.run(input_ids), eager_logits(model, input_ids), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llama():
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention_dropout=0.0,
    )
    model = build_model(config, seed=1)
    return model, llmopt.capture(model)


def test_packed_sequences_match_eager_and_stay_separate(llama):
    model, program = llama
    input_ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3]])  # row 1: sequences of 3 and 4 tokens
    got = program.run(input_ids, position_ids)  # [2, 7, V]
    torch.testing.assert_close(got, eager_logits(model, input_ids, position_ids), rtol=1e-5, atol=1e-5)
    first, second = program.run(input_ids[1:, :3]), program.run(input_ids[1:, 3:])
    torch.testing.assert_close(got[1:], torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)


def test_capture_from_a_single_prompt_example(llama):
    """A user's natural example is one prompt, [1, T]; the batch dim must still come out dynamic."""
    model, _ = llama
    program = llmopt.capture(model, example_inputs=(torch.randint(0, 97, (1, 6)),))
    input_ids = torch.randint(0, 97, (3, 9))
    torch.testing.assert_close(program.run(input_ids), eager_logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_capture_rejects_a_non_model():
    with pytest.raises(llmopt.CaptureError, match="expects a torch.nn.Module.*got str"):
        llmopt.capture("meta-llama/Llama-3.2-1B")


def test_capture_rejects_a_module_without_a_causal_lm_config():
    with pytest.raises(llmopt.CaptureError, match="Linear has no transformers config with a vocab_size"):
        llmopt.capture(torch.nn.Linear(4, 4))


class BranchOnValues(torch.nn.Module):
    """A causal LM whose forward branches on a tensor's value: torch.export cannot trace that."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=16, max_position_embeddings=32)
        self.embed = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16)

    def forward(self, input_ids, position_ids=None, use_cache=False):
        hidden = self.embed(input_ids)  # [B, T, 8]
        if hidden.sum() > 0:
            hidden = hidden * 2
        return CausalLMOutput(logits=self.head(hidden))


def test_capture_error_names_the_cause_and_the_model_line():
    with pytest.raises(llmopt.CaptureError) as caught:
        llmopt.capture(BranchOnValues())
    message = str(caught.value)
    assert "could not capture BranchOnValues" in message
    assert "GuardOnDataDependentSymNode" in message  # the cause: a data-dependent branch
    assert f"{Path(__file__).name}:" in message and "in forward" in message  # where, in the model's code
    assert "data-dependent Python control flow" in message  # what to try


def test_capture_rejects_a_model_whose_weights_are_not_loaded():
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    empty = build_model(config, seed=1).to("meta")  # what an empty init or device_map="meta" leaves
    with pytest.raises(llmopt.CaptureError, match=r"LlamaForCausalLM's weights are not loaded: model.embed_tokens.weight "
                                                  r"is on the meta device"):
        llmopt.capture(empty)


def test_capture_rejects_what_is_not_a_decoder_only_causal_lm():
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                      intermediate_size=64))
    with pytest.raises(llmopt.CaptureError, match=r"BertForMaskedLM cannot generate text .* load the model with "
                                                  r"AutoModelForCausalLM rather than BertForMaskedLM"):
        llmopt.capture(bert)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    with pytest.raises(llmopt.CaptureError, match=r"T5ForConditionalGeneration is an encoder-decoder model \(t5\); "
                                                  r"llmopt captures decoder-only causal LMs"):
        llmopt.capture(t5)


def test_capture_names_an_op_outside_aten_and_the_module_that_calls_it():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                           num_hidden_layers=1, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    grouped = MixtralForCausalLM._from_config(config, experts_implementation="grouped_mm").eval()
    with pytest.raises(llmopt.CaptureError, match=r"MixtralForCausalLM traces to transformers\.grouped_mm\w*\.default in "
                                                  r"model\.layers\.0\.mlp\.experts, an op outside ATen: .*load the model "
                                                  r"with experts_implementation='batched_mm'"):
        llmopt.capture(grouped)
    batched = MixtralForCausalLM._from_config(config, experts_implementation="batched_mm").eval()
    batched.load_state_dict(grouped.state_dict())
    input_ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(llmopt.capture(batched).run(input_ids), eager_logits(batched, input_ids),
                               rtol=1e-5, atol=1e-5)  # the fix the error names works


def test_the_suites_remembered_captures_are_independent_copies_of_the_same_model_only(llama):
    """tests/capture_cache.py: a repeated capture is a copy of the first, unaltered by what was done to the first;
    other weights, or a hook on the model, capture afresh."""
    model, first = llama
    again = llmopt.capture(model)
    head = again.lm_head().weight
    assert again is not first and again.get_weight(head) is not first.get_weight(head)
    again.set_weight(head, torch.zeros_like(again.get_weight(head)))
    input_ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(llmopt.capture(model).run(input_ids), eager_logits(model, input_ids),
                               rtol=1e-5, atol=1e-5)
    other = build_model(model.config, seed=7)
    torch.testing.assert_close(llmopt.capture(other).run(input_ids), eager_logits(other, input_ids),
                               rtol=1e-5, atol=1e-5)
    doubling = other.get_input_embeddings().register_forward_hook(lambda module, args, out: out * 2)
    hooked = llmopt.capture(other).run(input_ids)
    doubling.remove()
    assert not torch.allclose(hooked, eager_logits(other, input_ids), rtol=1e-3, atol=1e-3)
