"""Every family's tiny configs export with torch.export (dynamic batch and token dims) and match eager."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmopt.testing import FAMILIES, build_model, config_strategy, input_ids_strategy
from llmopt.testing.configs import MAX_POSITIONS


class Logits(torch.nn.Module):
    """`forward(input_ids [B, T], position_ids [B, T]) -> logits [B, T, V]` without a KV cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def export(module: torch.nn.Module, vocab: int) -> torch.export.ExportedProgram:
    input_ids = torch.randint(0, vocab, (2, 8))  # example sizes above 1: no 0/1 specialisation
    position_ids = torch.arange(8).expand(2, 8)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens", max=MAX_POSITIONS)}
    return torch.export.export(
        module, (input_ids, position_ids),
        dynamic_shapes={"input_ids": dims, "position_ids": dims}, strict=False,
    )


@st.composite
def positions_strategy(draw, length: int) -> torch.Tensor:
    """`[1, T]` positions: a later chunk of one sequence, then maybe a second sequence from 0.

    Without a cache or attention mask, transformers reads a step other than +1 as the start of a
    packed sequence and masks attention across it (all families but OPT), in eager and export alike.
    """
    first = draw(st.integers(1, length))
    start = draw(st.integers(0, MAX_POSITIONS - first))
    return torch.cat([torch.arange(start, start + first), torch.arange(length - first)])[None]


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_export_matches_eager(family, data):
    config = data.draw(config_strategy(family))
    module = Logits(build_model(config, seed=data.draw(st.integers(0, 2**16))))
    program = export(module, config.vocab_size).module()
    for _ in range(2):  # shapes other than the example's
        input_ids = data.draw(input_ids_strategy(config.vocab_size, max_batch=3, max_len=40))  # [B, T]
        batch, length = input_ids.shape
        position_ids = data.draw(positions_strategy(length)).expand(batch, length)
        with torch.no_grad():
            expected = module(input_ids, position_ids)  # [B, T, V]
            actual = program(input_ids, position_ids)
        assert expected.shape == (batch, length, config.vocab_size)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)  # same fp32 ops


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_configs_are_tiny_and_consistent(family, data):
    config = data.draw(config_strategy(family))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert config.hidden_size <= 64 and head_dim % 8 == 0
    assert config.num_attention_heads % kv_heads == 0
    assert 1 <= config.num_hidden_layers <= 2 and 32 <= config.vocab_size <= 300


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_build_model_is_deterministic_with_unit_scale_logits(family, data):
    config = data.draw(config_strategy(family))
    input_ids = torch.arange(12).view(2, 6) % config.vocab_size  # [2, 6]
    with torch.no_grad():
        first = build_model(config, seed=3)(input_ids).logits  # [2, 6, V]
        again = build_model(config, seed=3)(input_ids).logits
        other = build_model(config, seed=4)(input_ids).logits
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    assert 0.3 < first.std().item() < 10.0  # weights large enough that a wrong op shows


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_positions_restarting_at_zero_start_a_packed_sequence(family, data):
    """transformers 5.24, no cache and no mask: positions [0..3, 0..3] are two sequences; OPT ignores this."""
    config = data.draw(config_strategy(family))
    module = Logits(build_model(config))
    input_ids = data.draw(input_ids_strategy(config.vocab_size, max_batch=1, max_len=1)).repeat(1, 8)  # [1, 8]
    with torch.no_grad():
        packed = module(input_ids, torch.arange(4).repeat(1, 2))[:, 4:]  # [1, 4, V]
        alone = module(input_ids[:, 4:], torch.arange(4)[None])
    assert torch.allclose(packed, alone, rtol=1e-5, atol=1e-5) == (family != "opt")
