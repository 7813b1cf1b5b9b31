"""Sibling quantized linears merged at lowering (`llmopt.codegen.concat_linears`): the same logits, fewer linears,
no memory added.

On CPU the kernels run under the Triton interpreter in fp32 (tests/codegen/conftest.py); the published-width bf16
models with merged linears run in tests/test_triton_backend.py's `gpu` tests.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.export import Dim

import llmopt
from llmopt.codegen import kernels
from llmopt.codegen.concat_linears import concat_sibling_linears
from llmopt.codegen.lower import lower
from llmopt.codegen.quantize_inputs import linear_int8
from llmopt.passes import RTN, W8A8, FuseAttention, SmoothQuant
from llmopt.testing import FAMILIES, build_model, config_strategy, input_ids_strategy
from tests.test_triton_backend import tiny_config

# the Program's quantized linears, and what lowering turns them into
LINEARS = (torch.ops.llmopt.linear_wq.default, torch.ops.llmopt.linear_w8a8.default, kernels.linear_wq, linear_int8)


def _linears(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS]


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("recipe", ["rtn", "smoothquant"])
def test_q_k_v_and_gate_up_run_as_one_linear_each_with_the_same_logits(recipe, calibration):
    passes = [RTN(bits=4, group_size=32)] if recipe == "rtn" else [SmoothQuant(alpha=0.5)]
    reference = llmopt.compile(build_model(tiny_config("llama")), passes=passes + [FuseAttention()],
                               calibration=calibration, backend="torch")
    apart = lower(reference.program, cuda_graphs=False, concat_linears=False)
    merged = lower(reference.program, cuda_graphs=False)
    layers = 2
    # 7 linears a layer: q, k, v, o, gate, up, down -> qkv, o, gate_up, down (W8A8 ones are int8 GEMMs by now)
    assert len(_linears(merged.program.gm)) == 7 * layers
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    want = apart(ids)
    for got in (merged(ids), merged(ids, torch.arange(7).expand(2, 7))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference(ids), want, rtol=1e-4, atol=1e-4)  # the Program still computes the same
    assert len(_linears(apart.causal_gm)) == 7 * layers and len(_linears(merged.causal_gm)) == 4 * layers


def test_merging_adds_no_memory_and_a_second_lowering_shares_the_first_ones_weights():
    reference = llmopt.compile(build_model(tiny_config("llama")), passes=[RTN(bits=4, group_size=32)], backend="torch")
    program = reference.program
    before = program.parameter_bytes()
    first = lower(program, cuda_graphs=False)
    second = lower(program, cuda_graphs=False)
    q, k, v = (program.get_weight(lin.weight) for lin in program.linears()[:3])  # layer 0's q, k, v qweights
    merged = [getattr(gm, n.args[1].target) for gm in (first.causal_gm, first.general_gm, second.causal_gm)
              for n in _linears(gm)[:1]]
    assert {t.untyped_storage().data_ptr() for t in merged} == {q.untyped_storage().data_ptr()}
    assert k.storage_offset() == q.storage_offset() + q.numel() and v.storage_offset() == k.storage_offset() + k.numel()
    assert merged[0].shape[0] == q.shape[0] + k.shape[0] + v.shape[0]
    assert program.parameter_bytes() == before


def test_a_lowered_programs_weights_save_and_load(tmp_path):
    reference = llmopt.compile(build_model(tiny_config("llama")), passes=[RTN(bits=4, group_size=32)], backend="torch")
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(3))
    want = reference(ids)
    lower(reference.program, cuda_graphs=False)  # the Program's weights are views of merged tensors now
    llmopt.save(reference, tmp_path / "saved")
    torch.testing.assert_close(llmopt.load(tmp_path / "saved", backend="torch")(ids), want, rtol=0, atol=0)


class ThreeKinds(torch.nn.Module):
    """Five int4 linears of one x: a and b alike; c with groups of 64; d and e with a bias."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, rows, group, bias in (("a", 16, 32, False), ("b", 8, 32, False), ("c", 16, 64, False),
                                        ("d", 8, 32, True), ("e", 24, 32, True)):
            self.register_buffer(f"{name}_q", torch.randint(0, 256, (rows, 64), dtype=torch.uint8, generator=gen))
            self.register_buffer(f"{name}_s", torch.rand(rows, 128 // group, generator=gen) / 8)
            self.register_buffer(f"{name}_z", torch.randint(0, 16, (rows, 128 // group), generator=gen).float())
            if bias:
                self.register_buffer(f"{name}_b", torch.randn(rows, generator=gen))
        self.groups = {"a": 32, "b": 32, "c": 64, "d": 32, "e": 32}

    def forward(self, x):  # x: [B, T, 128] -> [B, T, 72]
        outs = [torch.ops.llmopt.linear_wq(x, getattr(self, f"{n}_q"), getattr(self, f"{n}_s"), getattr(self, f"{n}_z"),
                                           getattr(self, f"{n}_b", None), g, 4) for n, g in self.groups.items()]
        return torch.cat(outs, dim=-1)


def test_only_linears_of_one_format_merge():
    x = torch.randn(2, 3, 128)
    rows = {0: Dim("b", min=1, max=8), 1: Dim("t", min=1, max=64)}
    gm = torch.export.export(ThreeKinds(), (x, ), dynamic_shapes=(rows, )).module()
    want = gm(x)
    root = torch.nn.Module()
    assert concat_sibling_linears(gm, root) == 2  # (a, b) and (d, e); c alone
    widths = sorted(n.meta["val"].shape[-1] for n in _linears(gm))
    assert widths == [16, 24, 32]  # c, a + b, d + e
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)  # the reference matmul: fp32 rounding
    torch.testing.assert_close(gm(torch.randn(4, 5, 128)).shape, torch.Size([4, 5, 72]))


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
@pytest.mark.parametrize("recipe", ["rtn", "w8a8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_and_apart_lowerings_agree_on_every_family(family, recipe, data):
    """Any family's tiny config (biases on q/k/v in Qwen2 and OPT; q/k/v and gate/up already fused in Phi-3, GPT-2,
    GPT-NeoX): the lowering with sibling linears merged gives the logits of the one with every linear apart, with
    the expected number of linears fewer. W4 groups are 32 where every width allows (the Triton kernel), else 8 (the reference op)."""
    config = data.draw(config_strategy(family))
    program = llmopt.capture(build_model(config))
    widths = {program.get_weight(lin.weight).shape[1] for lin in program.linears()}
    group = 32 if all(k % 32 == 0 for k in widths) else 8  # 8: linear_wq stays on the reference op when lowered
    passes = [RTN(bits=4, group_size=group)] if recipe == "rtn" else [W8A8()]
    program = llmopt.compile(program, passes=passes + [FuseAttention()], backend="torch").program
    apart = lower(program, cuda_graphs=False, concat_linears=False)
    merged = lower(program, cuda_graphs=False)
    ids = data.draw(input_ids_strategy(config.vocab_size, max_batch=2, max_len=6))
    torch.testing.assert_close(merged(ids), apart(ids), rtol=1e-5, atol=1e-5)
    fewer = len(_linears(apart.causal_gm)) - len(_linears(merged.causal_gm))
    layers = config.num_hidden_layers
    # separate q/k/v (and gate/up in the gated MLPs) merge; Phi-3, GPT-2 and GPT-NeoX fuse them in the checkpoint
    assert fewer == {"llama": 3, "mistral": 3, "qwen2": 3, "gemma": 3, "opt": 2}.get(family, 0) * layers


def test_an_unmerged_adapter_over_merged_int4_bases():
    """QLoRA kept unmerged (int4 q/k/v bases, 16-bit LoRA branches on q and v): the bases merge, the float A linears
    that read the same input stay apart, and each branch still adds to its own slice."""
    from tests.test_compression_passes import group_size_for, peft_llama

    _, program = peft_llama()
    quantized = llmopt.compile(program.copy(), passes=[RTN(4, group_size_for(program))], backend="torch")
    apart = lower(quantized.program, cuda_graphs=False, concat_linears=False)
    merged = lower(quantized.program, cuda_graphs=False)
    assert len(_linears(apart.causal_gm)) - len(_linears(merged.causal_gm)) == 3 * 2  # q/k/v, gate/up; 2 layers
    ids = torch.randint(0, program.config["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(merged(ids), apart(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged(ids), quantized(ids), rtol=1e-4, atol=1e-4)
