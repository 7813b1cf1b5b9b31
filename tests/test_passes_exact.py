"""Exact passes keep the function: Smooth, ConstantFolding, DeadCodeElimination, MergeLoRA (with peft).

Tolerance, fp32 throughout: these passes only rescale weights by positive factors (Smooth), merge
W + s·B·A in fp32 (MergeLoRA) or evaluate weight-only nodes ahead of time (ConstantFolding), so each
weight element changes by a few roundings (~1e-7 relative). Through <= 2 tiny layers, logits of
size O(1) move by ~1e-6; 1e-4 relative and absolute leaves a 100x margin, while a scale applied to
the wrong channel or a dropped LoRA branch moves logits by O(0.1-1).
"""
import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, LlamaConfig

import llmopt
from llmopt.calibration import Calibration
from llmopt.passes import ConstantFolding, DeadCodeElimination, MergeLoRA, Smooth
from llmopt.producers import fold_scales, input_groups
from llmopt.testing import FAMILIES, build_model, config_strategy, input_ids_strategy
from llmopt.testing.equivalence import assert_equivalent

TOL = 1e-4
aten = torch.ops.aten
SLOW = settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {  # the linear modules peft may wrap, per family
    "llama": LLAMA_LINEARS, "mistral": LLAMA_LINEARS, "qwen2": LLAMA_LINEARS, "gemma": LLAMA_LINEARS,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def calibration_of(ids_list) -> Calibration:
    return Calibration([torch.tensor(ids) for ids in ids_list], batch_size=2, progress=False)


@st.composite
def calibration_strategy(draw, vocab):
    """1-2 batches of token ids [N, T], N in 1..3, T in 2..12."""
    batches = []
    for _ in range(draw(st.integers(1, 2))):
        n, t = draw(st.integers(1, 3)), draw(st.integers(2, 12))
        batches.append(draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=t, max_size=t), min_size=n, max_size=n)))
    return calibration_of(batches)


def constant_nodes(program) -> list:
    """call_function nodes whose inputs are all weights."""
    weights = set(program.nodes("get_attr"))
    return [n for n in program.graph.nodes if n.op == "call_function" and n.all_input_nodes and set(n.all_input_nodes) <= weights]


@pytest.mark.parametrize("family", FAMILIES)
@SLOW
@given(data=st.data())
def test_smooth_constant_folding_and_dead_code_elimination_keep_the_function(family, data):
    config = data.draw(config_strategy(family))
    captured = llmopt.capture(build_model(config, seed=data.draw(st.integers(0, 2**16))))
    input_ids = data.draw(input_ids_strategy(config.vocab_size, max_batch=2, max_len=12))
    check_smooth(captured.copy(), captured, data.draw(st.floats(0.0, 1.0)), data.draw(calibration_strategy(config.vocab_size)), input_ids)
    folded = check_constant_folding(captured.copy(), captured, input_ids)
    check_dead_code_elimination(folded, captured, input_ids)


def check_smooth(program, reference, alpha, calibration, input_ids):
    result = Smooth(alpha)(program, calibration)
    norm_groups = [g for g in input_groups(reference) if g.kind == "norm"]
    assert result.stats == {"norms_smoothed": len(norm_groups), "linears_smoothed": sum(len(g.consumers) for g in norm_groups)}
    assert result.program.recipe == [{"pass": "Smooth", "options": {"alpha": alpha}}]
    result.program.verify()
    assert_equivalent(result.program, reference, input_ids, rtol=TOL, atol=TOL)


def check_constant_folding(program, reference, input_ids):
    constants, bytes_before = len(constant_nodes(program)), program.parameter_bytes()
    result = ConstantFolding()(program)
    assert result.stats["nodes_folded"] >= constants and result.changed == (constants > 0)
    assert constant_nodes(result.program) == []  # a fixpoint: nothing left to fold
    assert result.program.parameter_bytes() <= bytes_before  # folding never grows the model
    assert_equivalent(result.program, reference, input_ids, rtol=TOL, atol=TOL)
    return result.program


def check_dead_code_elimination(program, reference, input_ids):
    embedding = program.embeddings()[0].node
    with program.graph.inserting_after(embedding):
        dead = program.graph.call_function(aten.mul.Tensor, (embedding, 2.0))
    unused = program.add_weight("unused_weight", torch.ones(4))
    result = DeadCodeElimination()(program)
    assert result.changed and result.stats == {"nodes_removed": 2}
    assert dead not in result.program.graph.nodes
    assert unused.target not in result.program.weights() and not hasattr(result.program.gm, unused.target)
    assert_equivalent(result.program, reference, input_ids, rtol=TOL, atol=TOL)


@st.composite
def lora_strategy(draw, family):
    """A peft LoraConfig: a non-empty subset of the family's linears, rank 1-7 (below every width of
    the tiny configs: MergeLoRA merges low-rank pairs only), alpha 1-32."""
    targets = draw(st.lists(st.sampled_from(LORA_TARGETS[family]), min_size=1, unique=True))
    return peft.LoraConfig(
        r=draw(st.integers(1, 7)), lora_alpha=draw(st.integers(1, 32)), target_modules=targets,
        lora_dropout=0.0, fan_in_fan_out=family == "gpt2",
    )


def peft_model(config, lora_config, seed):
    model = peft.get_peft_model(build_model(config, seed=seed), lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would make the merge a no-op
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
@SLOW
@given(data=st.data())
def test_merge_lora_merges_every_adapter(family, data):
    config = data.draw(config_strategy(family))
    model = peft_model(config, data.draw(lora_strategy(family)), seed=data.draw(st.integers(0, 2**16)))
    adapters = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    program = llmopt.capture(model)
    linears_before = len(program.linears())
    result = MergeLoRA()(program)
    assert result.stats == {"lora_merged": adapters} and result.changed
    merged = result.program
    merged.verify()
    assert len(merged.linears()) == linears_before - 2 * adapters  # each A and B linear is gone
    names = [(n.target + " " + n.meta.get("weight_name", "")).lower() for n in merged.nodes("get_attr")]
    assert [name for name in names if "lora" in name] == []
    input_ids = data.draw(input_ids_strategy(config.vocab_size, max_batch=2, max_len=12))
    assert_equivalent(merged, model, input_ids, rtol=TOL, atol=TOL)


def test_merge_lora_merges_gpt2_conv1d_adapters():
    """GPT-2's Conv1D runs on a [B*T, K] view of x and is viewed back, while peft's branch reads x."""
    config = GPT2Config(vocab_size=50, n_embd=32, n_inner=64, n_layer=1, n_head=2, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1)
    model = peft_model(config, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True), seed=0)
    result = MergeLoRA()(llmopt.capture(model))
    assert result.stats == {"lora_merged": 1}
    assert_equivalent(result.program, model, torch.arange(10).view(2, 5), rtol=TOL, atol=TOL)


def test_smooth_flattens_injected_outlier_channels():
    """Inject outliers without changing the function (a norm's channels ×F, its consumers' columns ÷F,
    as shared/README.md describes), then Smooth(0.5): max|X_j| per channel gets flatter."""
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, attention_dropout=0.0,
    )
    program = llmopt.capture(build_model(config, seed=5))
    groups = [g for g in input_groups(program) if g.kind == "norm"]
    outliers = torch.tensor([3, 17, 40, 58])
    for g in groups:
        s = torch.ones(config.hidden_size)
        s[outliers] = 1.0 / 30.0  # fold_scales divides the norm by s: those channels grow ×30
        fold_scales(program, g, s)
    calibration = calibration_of([torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)).tolist()])

    def spread(prog):  # per norm: max over channels of max|X_j|, over the median channel
        stats = calibration.statistics(prog, [g.value for g in input_groups(prog) if g.kind == "norm"])
        return torch.stack([s.absmax.max() / s.absmax.median() for s in stats.values()])

    before = spread(program)
    assert (before > 20).all()  # the injection worked
    smoothed = Smooth(0.5)(program, calibration).program
    after = spread(smoothed)
    # alpha 0.5 leaves max|X_j|·max|W_j| spread out as its square root; the injection left that product
    # unchanged (activations ×30, weight columns ÷30), so the outliers' spread (~30) shrinks to ~1
    assert (after < before.sqrt()).all(), (before, after)
