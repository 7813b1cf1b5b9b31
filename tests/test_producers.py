"""Producer analysis: which op feeds each group of linears, the measured channel maps, and exact scale folding."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.producers import fold_scales, input_groups
from llmopt.testing import FAMILIES, build_model, config_strategy, input_ids_strategy
from llmopt.testing.equivalence import assert_equivalent

# One layer's groups, in graph order: (consumer names, producer kind, producer name). Names are relative
# to the layer; '' producer for norms, None for 'other' (GELU between GPT-2's and GPT-NeoX's MLP linears).
LLAMA_LIKE = [
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", ""),
    (("self_attn.o_proj",), "linear", "self_attn.v_proj"),
    (("mlp.gate_proj", "mlp.up_proj"), "norm", ""),
    (("mlp.down_proj",), "linear", "mlp.up_proj"),
]
GROUPS = {
    "llama": ("model.layers", LLAMA_LIKE), "mistral": ("model.layers", LLAMA_LIKE),
    "qwen2": ("model.layers", LLAMA_LIKE), "gemma": ("model.layers", LLAMA_LIKE),
    "phi3": ("model.layers", [
        (("self_attn.qkv_proj",), "norm", ""), (("self_attn.o_proj",), "linear", "self_attn.qkv_proj"),
        (("mlp.gate_up_proj",), "norm", ""), (("mlp.down_proj",), "linear", "mlp.gate_up_proj"),
    ]),
    "gpt2": ("transformer.h", [
        (("attn.c_attn",), "norm", ""), (("attn.c_proj",), "linear", "attn.c_attn"),
        (("mlp.c_fc",), "norm", ""), (("mlp.c_proj",), "other", None),
    ]),
    "opt": ("model.decoder.layers", [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", ""),
        (("self_attn.out_proj",), "linear", "self_attn.v_proj"), (("fc1",), "norm", ""), (("fc2",), "linear", "fc1"),
    ]),
    "gpt_neox": ("gpt_neox.layers", [
        (("attention.query_key_value",), "norm", ""), (("attention.dense",), "linear", "attention.query_key_value"),
        (("mlp.dense_h_to_4h",), "norm", ""), (("mlp.dense_4h_to_h",), "other", None),
    ]),
}


def value_channel_map(family, config) -> torch.Tensor:
    """Where o_proj's input channel j comes from in its producer's output (query head h reads KV head
    h // (H / KV); fused q/k/v layouts put v after q and k, or third in each head's block for NeoX)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    h = torch.arange(heads).repeat_interleave(head_dim)  # [H*D] query head of each channel
    d = torch.arange(head_dim).repeat(heads)
    kv = h // (heads // kv_heads)
    if family == "phi3":
        return (heads + kv_heads) * head_dim + kv * head_dim + d
    if family == "gpt2":
        return 2 * config.hidden_size + h * head_dim + d
    if family == "gpt_neox":
        return h * 3 * head_dim + 2 * head_dim + d
    return kv * head_dim + d


def mlp_channel_map(family, config) -> torch.Tensor:
    """down_proj's (fc2's) input channel j comes from up's channel j; Phi-3's up is gate_up's second half."""
    width = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    return torch.arange(width) + (width if family == "phi3" else 0)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_input_groups_per_family(family, data):
    config = data.draw(config_strategy(family))
    program = llmopt.capture(build_model(config))
    groups = input_groups(program)
    prefix, layout = GROUPS[family]
    assert len(groups) == len(layout) * config.num_hidden_layers
    for i, group in enumerate(groups):
        layer, (consumers, kind, producer) = divmod(i, len(layout))[0], layout[i % len(layout)]
        base = f"{prefix}.{layer}."
        assert tuple(c.name for c in group.consumers) == tuple(base + c for c in consumers)
        assert group.kind == kind, group.name
        if kind == "norm":
            assert group.norm is not None and group.path[-1] is group.norm.node and group.foldable  # through casts
        elif kind == "linear":
            assert group.producer.name == base + producer
            attention_output = "proj" in consumers[0] and "attn" in consumers[0] or consumers[0] == "attention.dense"
            expected = value_channel_map(family, config) if attention_output else mlp_channel_map(family, config)
            assert torch.equal(group.channel_map, expected), group.name
            gqa = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) < config.num_attention_heads
            assert group.foldable, group.name
            assert (group.ties is not None) == (attention_output and gqa), group.name  # repeated KV channels are tied
            if group.ties is not None:
                assert torch.equal(group.ties, group.channel_map)
        else:
            assert group.producer is None and not group.foldable
    head = input_groups(program, include_lm_head=True)[-1]  # left out unless asked for
    assert [c.node for c in head.consumers] == [program.lm_head().node] and head.kind == "norm"


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fold_scales_keeps_the_function(family, data):
    config = data.draw(config_strategy(family))
    program = llmopt.capture(build_model(config, seed=data.draw(st.integers(0, 2**16))))
    reference = program.copy()
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    groups = input_groups(program, include_lm_head=data.draw(st.booleans()))
    for group in groups:
        width = program.shape(group.value)[-1]
        scales = torch.exp(2 * torch.randn(width, generator=generator))  # positive, spread over e^±6
        fold_scales(program, group, scales)
    program.verify()
    input_ids = data.draw(input_ids_strategy(config.vocab_size, max_batch=2, max_len=12))
    # fp32: each weight picks up two roundings (÷s at the producer, ×s at the consumer), ~1e-7
    # relative; through <= 2 layers the logits (O(1)) move by ~1e-6, far inside 1e-4, while a wrong
    # channel map or a missed consumer moves them by O(1).
    assert_equivalent(program, reference, input_ids, rtol=1e-4, atol=1e-4)
    changed = sum(not torch.equal(w, reference.weights().get(name, w)) for name, w in program.weights().items())
    assert changed >= len(groups)  # the scales really landed in the weights


GQA_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3")


def _is_gqa(config) -> bool:
    return config.num_key_value_heads < config.num_attention_heads


@pytest.mark.parametrize("family", GQA_FAMILIES)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_scales_equal_over_ties_fold_into_v_under_gqa(family, data):
    """Under GQA a scale per v channel (repeated over the query heads that read it) folds into v's rows,
    with no scale node; a scale that differs within a tied set gets a scale node; both keep the function."""
    config = data.draw(config_strategy(family).filter(_is_gqa))
    program = llmopt.capture(build_model(config, seed=data.draw(st.integers(0, 2**16))))
    reference = program.copy()
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    tied = [g for g in input_groups(program) if g.ties is not None]
    assert len(tied) == config.num_hidden_layers  # o_proj's input in every layer
    nodes_before = len(program.graph.nodes)
    for group in tied:
        v_channels = torch.exp(2 * torch.randn(int(group.ties.max()) + 1, generator=generator))  # [producer width]
        s = v_channels[group.ties]  # [K], equal over each tied set
        producer_before = program.get_weight(group.producer.weight).clone()
        fold_scales(program, group, s)
        rows = torch.unique(group.ties)
        changed = ~torch.isclose(program.get_weight(group.producer.weight)[rows], producer_before[rows]).all(dim=1)
        assert changed.float().mean() > 0.9  # v's rows took the scales
    assert len(program.graph.nodes) == nodes_before  # folded, no scale node
    input_ids = data.draw(input_ids_strategy(config.vocab_size, max_batch=2, max_len=12))
    assert_equivalent(program, reference, input_ids, rtol=1e-4, atol=1e-4)

    untied = input_groups(program)
    group = next(g for g in untied if g.ties is not None)
    s = torch.ones(program.shape(group.value)[-1])
    s[0] = 2.0  # one channel of a tied set differs from the others
    fold_scales(program, group, s)
    assert len(program.graph.nodes) == nodes_before + 2  # a scale node and its weight
    assert_equivalent(program, reference, input_ids, rtol=1e-4, atol=1e-4)
