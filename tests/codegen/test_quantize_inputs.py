"""W8A8 activation quantization in lowered graphs (`llmopt.codegen.quantize_inputs`): once per shared
input, inside the generated kernel of the norm that makes the input, bit-identical to the reference.

On CPU the kernels run under the Triton interpreter (tests/codegen/conftest.py) in fp32 and fp16; the
bf16 check on CUDA (where the scale is a product with fl(1/127), as torch computes it there) is a `gpu`
test. Outputs start as NaN (the `poison` fixture).
"""
import pytest
import torch
import transformers as tf
from torch.export import Dim

import llmopt
from llmopt.codegen import dump_kernels
from llmopt.codegen.fusion import fuse_graph_module, partition
from llmopt.codegen.lower import _lowered_graph
from llmopt.codegen.quantize_inputs import split_w8a8
from llmopt.ops.linear_w8a8 import quantize_per_token, quantize_static
from llmopt.passes import FuseAttention, SmoothQuant
from llmopt.testing import build_model

aten = torch.ops.aten
ROPE = {"rope_type": "default", "rope_theta": 10_000.0}
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run with -m gpu on the H200")]


def record(gm, *args) -> dict:
    """Run `gm`; -> {node name: value} for every node."""
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    Recorder(gm).run(*args)
    return values


def _export(module, args):
    rows = {0: Dim("b", min=1, max=64), 1: Dim("t", min=1, max=4096)}
    return torch.export.export(module, args, dynamic_shapes=tuple(rows for _ in args)).module()


# ---- the reference's own quantization, exported and fused ----------------------------------------------


class PerToken(torch.nn.Module):
    def forward(self, x):  # x: [B, T, K]
        return quantize_per_token(x)  # q: [B, T, K] int8, scale: [B, T, 1]


class Static(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("scale", torch.tensor([scale]))

    def forward(self, x):  # x: [B, T, K]
        return quantize_static(x, self.scale)  # q: [B, T, K] int8


def _with_ties(dtype) -> torch.Tensor:
    """x: [2, 3, 40]; row 0 of batch 0 has max|x| = 127, so its scale is exactly 1 and its values are
    the quotients: ties of both parities, and 0.5 - 2^-25 (which a naive floor(v + 0.5) rounds up)."""
    x = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1.0, 300.0]).view(1, 3, 1)
    special = [127.0, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5, 0.0, 1e-9]
    if dtype == torch.float32:
        special += [0.49999997, -0.49999997, 1.4999999, -1.4999999]
    x[0, 0, : len(special)] = torch.tensor(special)
    x[1, 2] = 0.0  # an all-zero row: scale clamps to 1e-8 / 127
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_reference_quantization_fuses_bit_identical(poison, dtype):
    x = _with_ties(dtype)
    for module, kinds in ((PerToken(), ["amax"]), (Static(1.0), ["pointwise"]), (Static(0.25), ["pointwise"])):
        gm = _export(module, (x,))
        assert [g.kind for g in partition(gm.graph)] == kinds  # the whole quantization is one kernel
        got, want = fuse_graph_module(gm)(x), module(x)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert g.dtype == w.dtype and torch.equal(g, w), f"{type(module).__name__}: {(g.float() - w.float()).abs().max()}"


class Round(torch.nn.Module):
    def forward(self, x):
        return torch.round(x)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_GPU)])
def test_round_is_torch_round(poison, device):
    """Ties to even at every magnitude, 2**22 < |x| < 2**23 (halves still exist) and beyond (integers
    only). On CUDA this also shows the compiler keeps `(|x| + 2**23) - 2**23` as written."""
    ties = [k + 0.5 for k in range(-6, 6)] + [2.0**22 + 0.5, -(2.0**22) - 1.5, 2.0**23 - 0.5, -(2.0**23) + 0.5]
    others = [0.49999997, -0.49999997, 1.4999999, 1e-30, -0.3, 2.0**23 + 1, -(2.0**24) - 2, 3e38, float("inf"), -float("inf")]
    x = torch.cat([torch.tensor(ties + others), torch.randn(100) * 300]).reshape(2, 3, -1).to(device)  # [2, 3, 42]
    gm = _export(Round(), (x,))
    (got,) = fuse_graph_module(gm)(x)
    assert [g.kind for g in partition(gm.graph)] == ["pointwise"] and torch.equal(got, torch.round(x))


# ---- RMSNorm + residual add + quantization, one kernel --------------------------------------------------


class NormQK(torch.nn.Module):
    """Llama's residual add and RMSNorm feeding two W8A8 linears (q and k of attention)."""

    def __init__(self, k: int, n: int, static: bool, dtype: torch.dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.norm = torch.nn.Parameter((torch.rand(k, generator=gen) + 0.5).to(dtype))
        for name in ("q", "k"):
            self.register_buffer(f"{name}_w", torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen))
            self.register_buffer(f"{name}_s", torch.rand(n, generator=gen) / 100)
        self.register_buffer("act_scale", torch.tensor([0.05]) if static else None)

    def forward(self, x, residual):  # x, residual: [B, T, K]
        h = x + residual
        hf = h.float()
        normed = self.norm * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        q = torch.ops.llmopt.linear_w8a8(normed, self.q_w, self.q_s, None, self.act_scale)  # [B, T, N]
        k = torch.ops.llmopt.linear_w8a8(normed, self.k_w, self.k_s, None, self.act_scale)
        return h, normed, q, k


@pytest.mark.parametrize("static", [False, True], ids=["per_token", "per_tensor_static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_norm_and_quantization_are_one_kernel(poison, dtype, static):
    _check_norm_quantization(NormQK(k=48, n=24, static=static, dtype=dtype), tokens=5, static=static)


def _check_norm_quantization(module: NormQK, tokens: int, static: bool):
    """One kernel makes the norm and its quantization, bit-identical to the reference quantization of
    the norm's output, shared by both linears, whose outputs are bit-identical too."""
    device, dtype, k = module.norm.device, module.norm.dtype, module.norm.shape[0]
    gen = torch.Generator().manual_seed(2)
    x, residual = (torch.randn(2, tokens, k, generator=gen).to(device, dtype) for _ in range(2))
    gm = _export(module, (x, residual))
    assert split_w8a8(gm) == 1  # q and k share one quantization
    gm.recompile()
    groups = partition(gm.graph)
    assert [g.kind for g in groups] == (["mean"] if static else ["mean_amax"])
    assert any(n.target == aten.round.default for n in groups[0].nodes)  # the quantization, not only its amax

    fused = fuse_graph_module(gm)
    values = record(fused, x, residual)
    outputs = fused.graph.output_node().args[0]
    _, normed, q, k = (values[n.name] for n in outputs)
    act_scale = module.act_scale
    if static:
        assert torch.equal(values[f"{outputs[1].name}_int8"], quantize_static(normed, act_scale))
    else:
        want_q, want_s = quantize_per_token(normed)
        assert torch.equal(values[f"{outputs[1].name}_int8"], want_q) and torch.equal(values[f"{outputs[1].name}_scale"], want_s)
    # int8 x int8 sums are exact and the epilogue runs the reference's order: the outputs are bit-equal too
    assert torch.equal(q, torch.ops.llmopt.linear_w8a8(normed, module.q_w, module.q_s, None, act_scale))
    assert torch.equal(k, torch.ops.llmopt.linear_w8a8(normed, module.k_w, module.k_s, None, act_scale))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run with -m gpu on the H200")
@pytest.mark.parametrize("static", [False, True], ids=["per_token", "per_tensor_static"])
def test_norm_and_quantization_bf16_gpu(poison, static):
    """Llama-7B's width in bf16 on CUDA, where the per-token scale is amax · fl(1/127) as torch computes it."""
    _check_norm_quantization(NormQK(k=4096, n=256, static=static, dtype=torch.bfloat16).cuda(), tokens=300, static=static)


# ---- a SmoothQuant model -------------------------------------------------------------------------------


_COMPILED = {}


def _smoothquant_llama(activations: str):
    """Compiled once a test session (backend="torch"): tests only read its Program."""
    if activations not in _COMPILED:
        _COMPILED[activations] = _compile_smoothquant_llama(activations)
    return _COMPILED[activations]


def _compile_smoothquant_llama(activations: str):
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, rope_parameters=ROPE)
    model = build_model(config)
    calibration = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    return llmopt.compile(model, passes=[SmoothQuant(alpha=0.5, activations=activations), FuseAttention()],
                          calibration=calibration, backend="torch")


@pytest.mark.parametrize("activations", ["per_token", "per_tensor_static"])
def test_quantization_once_per_shared_input(activations):
    program = _smoothquant_llama(activations).program
    linears = [n for n in program.graph.nodes if n.target == torch.ops.llmopt.linear_w8a8.default]
    assert len(linears) == 2 * 7
    gm = _lowered_graph(program, causal_positions=True, fuse=False, generated=True)
    quantized = [n for n in gm.graph.nodes if n.target == aten._to_copy.default and n.kwargs["dtype"] == torch.int8]
    assert len(quantized) == 2 * 4  # per layer: q/k/v's input, o's, gate/up's, down's
    assert sum(n.target == aten.round.default for n in gm.graph.nodes) == 2 * 4
    groups = partition(gm.graph)
    owner = {n: g for g in groups for n in g.nodes}
    assert all(q in owner for q in quantized)  # every quantization is inside a generated kernel
    with_norm = [owner[q] for q in quantized if any(n.target == aten.rsqrt.default for n in owner[q].nodes)]
    assert len(with_norm) == 2 * 2  # q/k/v's and gate/up's: in the RMSNorm's kernel
    with_silu = [owner[q] for q in quantized if any(n.target == aten.silu.default for n in owner[q].nodes)]
    assert len(with_silu) == 2  # down's: in the SiLU·mul kernel
    # lowered without fusion: one quantize_rows launch per shared input instead
    plain = _lowered_graph(program, causal_positions=True, fuse=False)
    assert sum(n.name.endswith("_quantized") for n in plain.graph.nodes) == 2 * 4


def test_dump_kernels_shows_norm_and_quantization(tmp_path):
    program = _smoothquant_llama("per_token").program
    paths = dump_kernels(program, tmp_path)
    fused = [p for p in paths if p.name.startswith("fused_mean_amax_")]
    assert len(fused) == 2 * 2  # each layer's two RMSNorms, quantizing their outputs
    text = fused[0].read_text()
    assert "aten.round.default" in text and "int8" in text and "@triton.jit" in text
