"""The lossy compression passes (W8A8, SmoothQuant, RTN, AWQ, Wanda, MagnitudePrune, MergeLoRAQuantized)
on every family's tiny config and on the reference model: bounded error, the expected rewrites,
composition, QLoRA, and a PassError with the Program unchanged for every kind of bad input.

Error measure: ‖logits_q - logits‖ / ‖logits‖ over a fixed batch (fp32 on CPU). Bounds, from the
rounding each method adds (x rounded to a step Δ has error rms Δ/√12):
- 8 bits: Δ = max|v| / 127 for weight rows and activation rows; rows of 16-64 Gaussian-like values
  have max ≈ 2.5-3σ, so each operand carries ≈ 0.7% rms error, a linear ≈ 1%; two layers of
  linears in series (about 8), adding in quadrature, ≈ 3%: bound 8%.
- 4 bits: Δ = range / 15 per group; groups of 8-64 Gaussian values span ≈ 3.5-5σ, ≈ 8% rms per
  weight, about 8 in series ≈ 25%: bound 40%.
- Pruning half the weights is not small: the bound is what a random mask of the same sparsity does.
"""
import math
from pathlib import Path

import pytest
import torch
from hypothesis import find, settings
from peft import LoraConfig, get_peft_model

import llmopt
from llmopt.calibration import Calibration
from llmopt.errors import PassError
from llmopt.passes import AWQ, RTN, W8A8, FuseAttention, MagnitudePrune, MergeLoRAQuantized, Smooth, SmoothQuant, Wanda
from llmopt.passes.awq import StagedRun, plan_stages
from llmopt.passes.compress import quantize_groups
from llmopt.passes.merge_lora_quantized import lora_branch_linears
from llmopt.pass_manager import PassManager
from llmopt.producers import fold_scales, input_groups
from llmopt.testing import FAMILIES, build_model, config_strategy

REF_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-12m"
W8A8_OP, WQ_OP = torch.ops.llmopt.linear_w8a8.default, torch.ops.llmopt.linear_wq.default
_CACHE = {}


# ---- models ---------------------------------------------------------------------------------------
def _rich(config) -> bool:
    """Two layers, 4 query heads, GQA (2 KV heads) where the family has it, biases where optional."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None)
    biases = all(getattr(config, flag, True) for flag in ("attention_bias", "mlp_bias"))
    return config.num_hidden_layers == 2 and heads == 4 and kv in (None, 2) and biases


def family(name: str):
    """(config, eager model, Program) of a fixed tiny config of the family (hypothesis' simplest rich one)."""
    if name not in _CACHE:
        config = find(config_strategy(name), _rich, settings=settings(database=None, derandomize=True, max_examples=2000))
        model = build_model(config, seed=1)
        _CACHE[name] = (config, model, llmopt.capture(model))
    return _CACHE[name]


def reference(layers: int):
    """The reference model (trained; GQA) cut to its first `layers` layers, the same with 6 outlier
    channels of factor 30 injected at every norm's output as in shared/README.md (function-preserving),
    and tokens [8, 64]."""
    if ("ref", layers) not in _CACHE:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(REF_MODEL, dtype=torch.float32, num_hidden_layers=layers)
        program = llmopt.capture(model)
        outliers = program.copy()
        gen = torch.Generator().manual_seed(0)
        for g in input_groups(outliers):
            if g.kind == "norm":
                s = torch.ones(program.get_weight(g.norm.weight).shape[0])
                s[torch.randperm(s.shape[0], generator=gen)[:6]] = 1 / 30
                fold_scales(outliers, g, s)
        outliers.recompile()
        ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
        _CACHE["ref", layers] = program, outliers, ids
    return _CACHE["ref", layers]


def calibration(vocab: int, n: int = 8, t: int = 16) -> Calibration:
    return Calibration([torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(2))], progress=False)


def inputs(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))  # [B, T]


def rel_error(program, baseline, ids) -> float:
    key = ("logits", id(baseline), ids.data_ptr(), tuple(ids.shape))
    if key not in _CACHE:
        _CACHE[key] = baseline.run(ids)  # baselines are cached Programs, never changed
    ref = _CACHE[key]
    return float((program.run(ids) - ref).norm() / ref.norm())


def group_size_for(program) -> int:
    """The largest of 32, 16, 8 that divides the input dim of every linear outside LoRA branches."""
    branch = lora_branch_linears(program)
    ks = [program.get_weight(lin.weight).shape[1] for lin in program.linears() if lin.node not in branch]
    return next(g for g in (32, 16, 8) if all(k % g == 0 for k in ks))


def run(passes, program, calib=None):
    """Apply `passes` in order, then verify the Program (graph well-formed, every op known, shapes)."""
    for p in passes:
        program = p(program, calib).program
    program.verify()
    return program


def random_prune(program, sparsity: float, seed: int = 0):
    """Zero a random `sparsity` fraction of each row of every non-head linear (the baseline of pruning)."""
    pruned, gen = program.copy(), torch.Generator().manual_seed(seed)
    head = pruned.lm_head().node
    for lin in pruned.linears():
        if lin.node is not head:
            w = pruned.get_weight(lin.weight)
            order = torch.rand(w.shape, generator=gen).argsort(dim=1)[:, : int(w.shape[1] * sparsity)]
            pruned.set_weight(lin.weight, w.scatter(1, order, 0.0))
    return pruned


# ---- every pass on every family -------------------------------------------------------------------
PASSES = {
    "w8a8": (lambda g: W8A8(), 0.08),
    "smoothquant_search_static": (lambda g: SmoothQuant("search", activations="per_tensor_static"), 0.08),
    "rtn": (lambda g: RTN(4, g), 0.4),
    "awq_nearest": (lambda g: AWQ(4, g, rounding="nearest"), 0.4),
    "awq_learned": (lambda g: AWQ(4, g, tune_steps=4), 0.4),  # the default rounding, few steps
    "wanda_2of4": (lambda g: Wanda(0.5, "2:4"), None),
    "magnitude": (lambda g: MagnitudePrune(0.5), None),
}


@pytest.mark.parametrize("pass_name", sorted(PASSES))
@pytest.mark.parametrize("family_name", FAMILIES)
def test_pass_runs_on_every_family_with_bounded_error(family_name, pass_name):
    config, _, program = family(family_name)
    make, bound = PASSES[pass_name]
    ids = inputs(config.vocab_size)
    out = run([make(group_size_for(program))], program.copy(), calibration(config.vocab_size))
    err = rel_error(out, program, ids)
    if bound is None:  # pruning: better than a random mask of the same sparsity
        bound = rel_error(random_prune(program, 0.5), program, ids)
    assert 0 < err < bound, f"{pass_name} on {family_name}: relative logits error {err:.3f}, bound {bound:.3f}"


# ---- W8A8 and SmoothQuant -------------------------------------------------------------------------
@pytest.mark.parametrize("include_lm_head", [False, True])
def test_w8a8_rewrites_exactly_the_expected_linears(include_lm_head):
    config, _, program = family("llama")
    names = {lin.name for lin in program.linears()}
    head = program.lm_head().name
    out = run([W8A8(include_lm_head=include_lm_head)], program.copy())
    rewritten = {lin.name for lin in out.linears() if lin.node.target == W8A8_OP}
    assert rewritten == (names if include_lm_head else names - {head})
    assert all(lin.kind == "dense" for lin in out.linears() if lin.name not in rewritten)
    for lin in out.linears():
        if lin.name in rewritten:
            w = program.get_weight(next(x.weight for x in program.linears() if x.name == lin.name))
            q, scale, act = out.get_weight(lin.weight), out.get_weight(lin.node.args[2]), lin.node.args[4]
            assert q.dtype == torch.int8 and act is None  # per-token activations
            torch.testing.assert_close(scale, w.abs().amax(dim=1) / 127)
            assert int((q.float() * scale[:, None] - w).abs().gt(scale[:, None] / 2 + 1e-6).sum()) == 0


def test_w8a8_static_scales_are_calibration_absmax():
    config, _, program = family("qwen2")
    calib = calibration(config.vocab_size)
    absmax = calib.statistics(program, {lin.input for lin in program.linears()})
    out = run([W8A8("per_tensor_static")], program.copy(), calib)
    quantized = [lin for lin in out.linears() if lin.kind == "w8a8"]
    assert len(quantized) == len(program.linears()) - 1
    for lin in quantized:
        x = next(x.input for x in program.linears() if x.name == lin.name)
        torch.testing.assert_close(out.get_weight(lin.node.args[4]), absmax[x].absmax.max().reshape(1) / 127)


def test_smoothquant_is_smooth_then_w8a8():
    config, _, program = family("gemma")
    calib, ids = calibration(config.vocab_size), inputs(config.vocab_size)
    one = run([SmoothQuant(0.5)], program.copy(), calib)
    two = run([Smooth(0.5), W8A8()], program.copy(), calib)
    torch.testing.assert_close(one.run(ids), two.run(ids), rtol=1e-5, atol=1e-5)


def test_smoothquant_search_rescues_w8a8_from_outliers():
    program, outliers, ids = reference(layers=2)
    calib = Calibration([ids[:4]], progress=False)
    naive = rel_error(run([W8A8("per_tensor_static")], outliers.copy(), calib), program, ids[4:])
    searched = SmoothQuant("search", activations="per_tensor_static", grid=(0.3, 0.5, 0.7, 0.9))
    result = searched(outliers.copy(), calib)
    assert len(result.stats["alphas"]) == 4 and set(result.stats["alphas"]) <= set(searched.grid)
    assert rel_error(result.program, program, ids[4:]) < naive / 2


# ---- RTN and AWQ ----------------------------------------------------------------------------------
def _linear_outputs(program, ids) -> dict:
    """{linear name: output [tokens, N]} of a run of the whole Program."""
    by_node = {lin.node: lin.name for lin in program.linears()}
    outputs = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in by_node:
                outputs[by_node[n]] = out.reshape(-1, out.shape[-1])
            return out

    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        Recorder(program.gm).run(ids, pos)
    return outputs


def _rel_sq(x, ref) -> float:
    return float((x - ref).square().sum() / ref.square().sum())


def test_awq_error_at_most_rtn_on_the_reference_model_layers():
    program, _, ids = reference(layers=2)
    calib = Calibration([ids], progress=False)
    awq = run([AWQ(4, 128, grid=10, rounding="nearest")], program.copy(), calib)
    rtn = run([RTN(4, 128)], program.copy())
    exact, a, r = (_linear_outputs(p, ids) for p in (program, awq, rtn))
    # what each block adds to the residual stream (o_proj, down_proj outputs), measured on the calibration
    # tokens: AWQ's searches trade error between the linears of a group (gate for up, with duo scaling), but
    # the blocks' outputs, which the later layers read, must be closer to the float model than RTN's
    block_outputs = [n for n in exact if n.endswith((".o_proj", ".down_proj"))]
    assert len(block_outputs) == 4
    for name in block_outputs:
        err_awq, err_rtn = _rel_sq(a[name], exact[name]), _rel_sq(r[name], exact[name])
        assert err_awq < err_rtn, f"{name}: AWQ {err_awq:.4f} >= RTN {err_rtn:.4f}"
    assert rel_error(awq, program, ids) < rel_error(rtn, program, ids)


def test_awq_gptq_rounding_keeps_the_search_and_lowers_the_calibration_error():
    program, _, ids = reference(layers=2)
    calib = Calibration([ids], progress=False)
    nearest = AWQ(4, 128, grid=10, clip_sweeps=0, rounding="nearest")(program.copy(), calib)
    gptq = AWQ(4, 128, grid=10, clip_sweeps=0, rounding="gptq")(program.copy(), calib)
    # the first group's search sees the same inputs either way (later ones see the quantized earlier layers)
    assert nearest.stats["alphas"][0] == gptq.stats["alphas"][0]
    linears = {lin.name: lin for lin in gptq.program.linears() if lin.kind == "wq"}
    assert len(linears) == len(program.linears()) - 1
    first = next(lin for lin in nearest.program.linears() if lin.kind == "wq")  # q_proj of layer 0: same ranges
    assert torch.equal(nearest.program.get_weight(first.node.args[2]), gptq.program.get_weight(linears[first.name].node.args[2]))
    assert not torch.equal(nearest.program.get_weight(first.weight), gptq.program.get_weight(linears[first.name].weight))
    assert rel_error(gptq.program, program, ids) < rel_error(nearest.program, program, ids)


def test_awq_learned_rounding_lowers_the_error_of_every_block_and_of_the_logits():
    program, _, ids = reference(layers=2)
    calib = Calibration([ids], progress=False)
    held_out = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(9))
    nearest = AWQ(4, 128, grid=10, rounding="nearest")(program.copy(), calib)
    learned = AWQ(4, 128, grid=10, tune_steps=20)(program.copy(), calib)
    stages = len(learned.stats["tune_loss_ratio"])
    assert stages == 6  # per layer: q/k/v, o (v -> o is not scaled under GQA), gate/up + down
    assert learned.stats["stages_tuned"] == stages and learned.stats["stages_not_tunable"] == 0
    assert all(r < 1 for r in learned.stats["tune_loss_ratio"])
    assert learned.stats["alphas"][0] == nearest.stats["alphas"][0]  # the first search sees the same inputs
    for ids_ in (ids, held_out):
        assert rel_error(learned.program, program, ids_) < rel_error(nearest.program, program, ids_)
    learned.program.verify()


def test_awq_learned_rounding_leaves_blocks_with_custom_ops_to_round_to_nearest():
    config, _, program = family("llama")
    out = AWQ(4, group_size_for(program), tune_steps=2)(FuseAttention()(program.copy()).program,
                                                                           calibration(config.vocab_size))
    # the q/k/v blocks hold llmopt.attention, which has no gradient; the MLP blocks are tuned
    assert out.stats["stages_not_tunable"] == config.num_hidden_layers
    assert out.stats["stages_not_tunable"] + out.stats["stages_tuned"] <= len(out.stats["tune_loss_ratio"])
    assert rel_error(out.program, program, inputs(config.vocab_size)) < 0.4


def test_awq_gqa_vo_scales_v_to_o_by_folding_into_v():
    program, _, ids = reference(layers=2)  # 6 query heads on 2 KV heads
    calib = Calibration([ids], progress=False)
    default = AWQ(4, 128, grid=10, rounding="nearest")(program.copy(), calib).stats
    assert not any(name.endswith("o_proj") for name in default["groups"])  # AutoAWQ's choice: v→o left out under GQA
    stats = AWQ(4, 128, grid=10, gqa_vo=True, rounding="nearest")(program.copy(), calib).stats
    o_groups = [i for i, name in enumerate(stats["groups"]) if name.endswith("o_proj")]
    assert len(o_groups) == 2  # searched in both layers, with one scale per v channel
    assert stats["scale_nodes_inserted"] == 0  # folded into v_proj's rows
    assert stats["error_vs_rtn"][o_groups[0]] < 0.98  # layer 0's attention output has uneven channels


def test_staged_run_reproduces_the_program_stage_by_stage():
    config, _, program = family("gpt_neox")  # parallel residual, fused qkv, GELU MLP: an 'other' group
    ids = torch.randint(0, config.vocab_size, (5, 8), generator=torch.Generator().manual_seed(5))
    calib = Calibration([ids[:3], ids[3:]], batch_size=2, progress=False)  # chunks of 2, 1 and 2 rows
    targets = {lin.node for lin in program.linears()[:-1]}
    groups = input_groups(program)
    stages = plan_stages(program, groups, targets)
    # per layer: qkv with dense (v -> o folds into v), fc_in, fc_out (its GELU input gets a scale node)
    assert [len(s.groups) for s in stages] == [2, 1, 1] * config.num_hidden_layers
    staged = StagedRun(program, calib)
    for stage in stages:
        staged.advance(stage.start)
        rows = staged.sample({g.value: g.name for g in stage.groups}, max_rows=7)
        assert all(r.shape[0] == 7 for r in rows.values())
    output = next(n for n in program.graph.nodes if n.op == "output")
    staged.advance(output)
    logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    got = torch.cat([env[logits] for env in staged.envs])
    torch.testing.assert_close(got, program.run(ids), rtol=1e-6, atol=1e-6)


def test_awq_inserts_a_scale_node_for_gelu():
    config, _, program = family("gpt2")
    result = AWQ(4, group_size_for(program))(program.copy(), calibration(config.vocab_size))
    assert result.stats["scale_nodes_inserted"] == config.num_hidden_layers  # c_proj after GELU
    assert result.stats["linears_quantized"] == len(program.linears()) - 1
    searched = len(result.stats["groups"])
    assert searched >= config.num_hidden_layers and len(result.stats["error_vs_rtn"]) == searched
    assert all(0 < r <= 1 for r in result.stats["error_vs_rtn"])  # RTN (s = 1) is always a candidate


def test_rtn_layout_matches_the_compress_quantizer():
    config, _, program = family("gpt2")
    g = group_size_for(program)
    out = run([RTN(3, g, symmetric=True)], program.copy())
    for lin in out.linears()[:-1]:
        w = program.get_weight(next(x.weight for x in program.linears() if x.name == lin.name))
        expected = quantize_groups(w, 3, g, symmetric=True)
        assert lin.node.target == WQ_OP and lin.node.args[5:] == (g, 3)
        assert torch.equal(out.get_weight(lin.weight), expected.qweight)
        assert torch.equal(out.get_weight(lin.node.args[2]), expected.scales)


# ---- pruning --------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
def test_wanda_mask_counts(pattern):
    config, _, program = family("opt")
    out = run([Wanda(0.5, pattern)], program.copy(), calibration(config.vocab_size))
    head = out.lm_head()
    for lin in out.linears():
        w = out.get_weight(lin.weight)
        if lin.node is head.node:
            assert lin.node.meta.get("sparsity") is None and bool((w != 0).all())
            continue
        assert lin.node.meta["sparsity"] == pattern and lin.kind == "dense"
        if pattern == "unstructured":
            assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all()
        else:
            n, m = map(int, pattern.split(":"))
            assert ((w == 0).reshape(w.shape[0], -1, m).sum(dim=-1) == n).all()


def test_wanda_beats_magnitude_under_outliers():
    program, outliers, ids = reference(layers=2)
    calib = Calibration([ids[:4]], progress=False)
    wanda = rel_error(run([Wanda(0.5)], outliers.copy(), calib), program, ids[4:])
    magnitude = rel_error(run([MagnitudePrune(0.5)], outliers.copy()), program, ids[4:])
    assert wanda < magnitude


@pytest.mark.parametrize("rounding", ["nearest", "learned"])
def test_wanda_2of4_then_awq_keeps_the_pattern(rounding):
    config, _, program = family("llama")
    g = group_size_for(program)
    out = run([Wanda(0.5, "2:4"), AWQ(4, g, rounding=rounding, tune_steps=10)], program.copy(), calibration(config.vocab_size))
    quantized = [lin for lin in out.linears() if lin.kind == "wq"]
    assert len(quantized) == len(program.linears()) - 1
    for lin in quantized:
        qweight, scales, zeros = (out.get_weight(a) for a in lin.node.args[1:4])
        w = torch.ops.llmopt.linear_wq(torch.eye(scales.shape[1] * g), qweight, scales, zeros, None, g, 4).t()  # [N, K]
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(dim=-1) >= 2).all(), lin.name
        assert lin.node.meta["sparsity"] == "2:4"
    # pruning half of a random model's weights changes its logits entirely (relative error ~1); what AWQ adds on top
    # is measured against the pruned model: about what it costs a dense one (0.15 here, 0.22 dense)
    pruned = run([Wanda(0.5, "2:4")], program.copy(), calibration(config.vocab_size)).run(inputs(config.vocab_size))
    assert float((out.run(inputs(config.vocab_size)) - pruned).norm() / pruned.norm()) < 0.3


# ---- bad input ------------------------------------------------------------------------------------
def _state(program):
    return program.gm.code, {k: v.clone() for k, v in program.weights().items()}


def _assert_unchanged(program, state):
    code, weights = state
    assert program.gm.code == code
    now = program.weights()
    assert now.keys() == weights.keys()
    for k, v in weights.items():
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True)


QUANTIZERS = [
    lambda: RTN(4, 8), lambda: AWQ(4, 8), lambda: W8A8(), lambda: W8A8("per_tensor_static"),
    lambda: SmoothQuant(0.5), lambda: Wanda(0.5), lambda: MagnitudePrune(0.5, "2:4"),
]


@pytest.mark.parametrize("make", QUANTIZERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_refused(make, bad):
    config, _, program = family("llama")
    program = program.copy()
    lin = program.linears()[3]
    w = program.get_weight(lin.weight).clone()
    w[1, 2] = bad
    program.set_weight(lin.weight, w)
    state = _state(program)
    with pytest.raises(PassError, match=rf"layer {lin.name}.*NaN/Inf.*fix"):
        make()(program, calibration(config.vocab_size))
    _assert_unchanged(program, state)


@pytest.mark.parametrize("make", [lambda: AWQ(4, 8), lambda: Wanda(0.5), lambda: SmoothQuant(0.5), lambda: W8A8("per_tensor_static")])
def test_non_finite_activations_refused_with_program_restored(make):
    config, _, program = family("mistral")
    program = program.copy()
    norm = [n for n in program.norms()][2]  # layer 1's attention norm: AWQ has quantized layer 0 when it sees NaN
    program.set_weight(norm.weight, torch.full_like(program.get_weight(norm.weight), float("inf")))
    state = _state(program)
    with pytest.raises(PassError, match="NaN or Inf.*dtype"):
        make()(program, calibration(config.vocab_size))
    _assert_unchanged(program, state)


@pytest.mark.parametrize("make", [lambda: AWQ(4, 8), lambda: Wanda(0.5), lambda: SmoothQuant(0.5), lambda: W8A8("per_tensor_static")])
@pytest.mark.parametrize("empty", [lambda: Calibration([], progress=False), lambda: torch.zeros(0, 8, dtype=torch.long), lambda: None])
def test_empty_calibration_refused(make, empty):
    _, _, program = family("llama")
    program = program.copy()
    state = _state(program)
    with pytest.raises(PassError, match="calibration"):  # refused when built, or by the pass before it changes anything
        make()(program, empty())
    _assert_unchanged(program, state)


@pytest.mark.parametrize("make", [lambda: RTN(4, 24), lambda: AWQ(4, 24), lambda: MagnitudePrune(1 / 3, "1:3")])
def test_group_size_must_divide_the_input_dim(make):
    config, _, program = family("gpt_neox")  # every input dim is 32 or 64: neither 24 nor 3 divides it
    program = program.copy()
    state = _state(program)
    with pytest.raises(PassError, match=r"layer gpt_neox\.layers\.0\.") as err:
        make()(program, calibration(config.vocab_size))
    assert "pick a group size that divides K" in str(err.value) or "use 'unstructured'" in str(err.value)
    _assert_unchanged(program, state)


@pytest.mark.parametrize("make", [lambda: Wanda(0.0), lambda: Wanda(1.0), lambda: MagnitudePrune(-0.1), lambda: MagnitudePrune(1.5)])
def test_sparsity_outside_0_1_refused(make):
    with pytest.raises(PassError, match="strictly between 0 and 1"):
        make()


def test_nm_pattern_fixes_the_sparsity():
    with pytest.raises(PassError, match="pass sparsity=0.25"):
        Wanda(0.5, "1:4")
    with pytest.raises(PassError, match="'N:M'"):
        Wanda(0.5, "2of4")


@pytest.mark.parametrize("make", [lambda: RTN(bits=2), lambda: RTN(bits=16), lambda: AWQ(bits=5), lambda: AWQ(bits="4")])
def test_bits_outside_3_4_8_refused(make):
    with pytest.raises(PassError, match=r"bits='?\d+'? is not supported; use one of \(3, 4, 8\)"):
        make()


@pytest.mark.parametrize("make, shown", [(lambda: RTN(4, 0), "0"), (lambda: AWQ(4, -1), "-1"), (lambda: AWQ(4, "128"), "'128'"),
                                         (lambda: RTN(4, 64.0), "64.0")])
def test_group_size_that_is_no_positive_integer_refused_at_construction(make, shown):
    with pytest.raises(PassError, match=rf"group_size={shown} must be a positive integer that divides each linear's input"):
        make()


@pytest.mark.parametrize("make, message", [(lambda: Wanda("0.5"), r"sparsity='0.5' must lie strictly between 0 and 1"),
                                           (lambda: Wanda(0.5, pattern=None), r"pattern=None must be 'unstructured' or 'N:M'")])
def test_pruning_options_of_the_wrong_type_refused(make, message):
    with pytest.raises(PassError, match=message):
        make()


@pytest.mark.parametrize("kwargs, message", [({"grid": 0}, "grid=0"), ({"max_rows": 0}, "max_rows=0"),
                                             ({"clip_sweeps": -1}, "clip_sweeps=-1 must be >= 0"),
                                             ({"rounding": "stochastic"}, "rounding='stochastic' is not supported"),
                                             ({"tune_steps": -1}, "tune_steps=-1 must be >= 0")])
def test_awq_search_settings_out_of_range_refused(kwargs, message):
    with pytest.raises(PassError, match=message):
        AWQ(bits=4, **kwargs)


@pytest.mark.parametrize("first, second", [
    (lambda: RTN(4, 8), lambda: RTN(4, 8)),
    (lambda: W8A8(), lambda: W8A8()),
    (lambda: MagnitudePrune(0.5), lambda: MagnitudePrune(0.5)),
    (lambda: RTN(4, 8), lambda: AWQ(4, 8)),
    (lambda: W8A8(), lambda: Wanda(0.5)),
])
def test_applied_twice_refused(first, second):
    config, _, program = family("llama")
    calib = calibration(config.vocab_size)
    program = first()(program.copy(), calib).program
    state = _state(program)
    with pytest.raises(PassError, match="already"):
        second()(program, calib)
    _assert_unchanged(program, state)
    with pytest.raises(PassError, match="twice"):
        PassManager([first(), first()]).run(family("llama")[2].copy(), calib)


# ---- QLoRA ----------------------------------------------------------------------------------------
def peft_llama():
    """A LoRA adapter (r=4, nonzero B) on q and v of the tiny Llama: (eager peft model, Program)."""
    if "peft" not in _CACHE:
        config, _, _ = family("llama")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = get_peft_model(build_model(config, seed=1), lora)
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        _CACHE["peft"] = model.eval(), llmopt.capture(model)
    return _CACHE["peft"]


def test_rtn_on_a_peft_model_quantizes_the_base_and_keeps_lora_in_float():
    model, program = peft_llama()
    g = group_size_for(program)
    out = run([RTN(4, g)], program.copy())
    kinds = {lin.name: lin.kind for lin in out.linears()}
    lora = {name for name in kinds if ".lora_" in name}
    assert len(lora) == 8 and all(kinds[n] == "dense" for n in lora)  # A and B of q and v, 2 layers
    assert all(kinds[n] == "wq" for n in kinds if n not in lora and n != "lm_head")
    assert {lin.name for lin in out.linears() if lin.node in lora_branch_linears(out)} == lora
    # the unmerged adapter over the int4 base computes what peft computes with every non-LoRA linear
    # (the head excepted) dequantized
    bases = [
        m for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".lora_" not in name and not name.endswith("lm_head")
    ]
    originals = [base.weight for base in bases]
    ids = inputs(model.config.vocab_size)
    with torch.no_grad():
        for base, w in zip(bases, originals):
            base.weight = torch.nn.Parameter(quantize_groups(w.detach(), 4, g).dequantize())
        expected = model(input_ids=ids).logits
        for base, w in zip(bases, originals):
            base.weight = w
    torch.testing.assert_close(out.run(ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_lora_quantized_requantizes_and_reports_the_error():
    _, program = peft_llama()
    g = group_size_for(program)
    quantized = run([RTN(4, g)], program.copy())
    before = {lin.name: lin for lin in quantized.linears()}
    base_w = {n: _dequantized(quantized, lin) for n, lin in before.items() if lin.kind == "wq"}
    lora_delta = {}
    for full in (f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")):
        a, b = (quantized.get_weight(before[f"{full}.lora_{x}.default"].weight) for x in "AB")
        lora_delta[full] = 2.0 * b @ a  # scaling = lora_alpha / r
    result = MergeLoRAQuantized()(quantized, None)
    out = result.program
    assert result.stats["lora_merged"] == 4 and not lora_branch_linears(out)
    assert all(lin.kind == "wq" for lin in out.linears() if lin.name != "lm_head")
    errors = []
    for full, delta in lora_delta.items():
        merged = base_w[full] + delta
        lin = next(lin for lin in out.linears() if lin.name == full)
        errors.append(float((_dequantized(out, lin) - merged).norm() / merged.norm()))
    assert max(errors) == pytest.approx(result.stats["requantize_rel_error_max"], rel=1e-5)
    assert 0 < max(errors) < 0.2  # 4-bit requantization of a weight: ≈ 8% rms (module docstring)


def _dequantized(program, lin) -> torch.Tensor:
    qweight, scales, zeros = (program.get_weight(a) for a in lin.node.args[1:4])
    g, bits = lin.node.args[5:7]
    return torch.ops.llmopt.linear_wq(torch.eye(scales.shape[1] * g), qweight, scales, zeros, None, g, bits).t()


def test_merge_lora_quantized_refuses_when_asked():
    model, program = peft_llama()
    quantized = run([RTN(4, group_size_for(program))], program.copy())
    state = _state(quantized)
    fixes = r"on_quantized='requantize'.*unmerged.*MergeLoRA\(\) before RTN/AWQ"
    with pytest.raises(PassError, match=r"quantized bases \(model\.layers\.0\.self_attn\.q_proj, .*v_proj\).*" + fixes):
        MergeLoRAQuantized("refuse")(quantized, None)
    _assert_unchanged(quantized, state)
    assert math.isfinite(quantized.run(inputs(model.config.vocab_size)).sum().item())
