"""2:4 sparse linears in the triton lowering (`llmopt.codegen.sparse`).

On CPU: which backend each (fake) device gets, the dtype and shape rules, the plan on pruned Programs
(weights checked, marks only reported), the graph rewrite (with dense stand-ins for the compressed
weights), and the interpreted lowering falling back to dense with the reason in the report. The `gpu`
tests run torch's semi-structured kernels on the H200: one linear with bias and padded rows, and a
Wanda 2:4 model through backend="triton" against backend="torch".
"""
import pytest
import torch
import transformers as tf

import llmopt
from llmopt.calibration import Calibration
from llmopt.codegen import lower
from llmopt.codegen.sparse import SparseDevice, compress, decide, plan, rewrite, semi_structured_linear, sparse_backend
from llmopt.passes import FuseAttention, MagnitudePrune, Wanda
from llmopt.passes.compress import magnitude_scores, prune_mask
from llmopt.program import run_logits
from llmopt.testing import build_model

H200 = SparseDevice("cuda", (9, 0), cusparselt=True)
A100_NO_CUSPARSELT = SparseDevice("cuda", (8, 0), cusparselt=False)
SPARSE_OP = semi_structured_linear


def tiny_llama(hidden: int = 64, layers: int = 2, vocab: int = 128):
    """Every linear's N and K are multiples of 32 (q/o 64 x 64, k/v 32 x 64, MLP 128 x 64 and 64 x 128)."""
    return tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


_CAPTURED = {}


def captured(config, dtype=torch.float32, device="cpu"):
    """llmopt.capture(build_model(config, dtype)) once a module per (config, dtype, device): a copy each call."""
    key = (config.to_json_string(), dtype, str(device))
    if key not in _CAPTURED:
        _CAPTURED[key] = llmopt.capture(build_model(config, dtype=dtype).to(device))
    return _CAPTURED[key].copy()


def pruned(passes, config=None, dtype=torch.float32, device="cpu"):
    config = config or tiny_llama()
    calib = Calibration([torch.randint(0, config.vocab_size, (4, 32), device=device)], progress=False)
    return llmopt.compile(captured(config, dtype, device), passes=passes, calibration=calib, backend="torch").program


# ---- the rule, on fake devices ---------------------------------------------------------------------
@pytest.mark.parametrize("device, backend, reason", [
    (SparseDevice("cpu"), None, "on cpu: torch's semi-structured kernels are CUDA-only"),
    (SparseDevice("hip"), None, "on hip"),
    (SparseDevice("cuda", (7, 5), True), None, "compute capability 7.5"),
    (SparseDevice("cuda", (8, 0), True), "cusparselt", ""),
    (SparseDevice("cuda", (8, 6), False), "cutlass", ""),
    (H200, "cusparselt", ""),
    (SparseDevice("cuda", (9, 0), False), None, "9.0 without cuSPARSELt"),
    (SparseDevice("cuda", (10, 0), True), None, "compute capability 10.0"),
])
def test_backend_per_device(device, backend, reason):
    got, why = sparse_backend(device)
    assert got == backend and reason in why and bool(why) == (backend is None)


def test_sparse_device_of_cpu():
    assert SparseDevice.of("cpu") == SparseDevice("cpu")


@pytest.mark.parametrize("args, backend, reason", [
    (((4096, 4096), torch.bfloat16, H200), "cusparselt", ""),
    (((11008, 4096), torch.float16, H200), "cusparselt", ""),
    (((4096, 4096), torch.float32, H200), None, "float32 weights"),
    (((4096, 4096), torch.bfloat16, SparseDevice("cpu")), None, "CUDA-only"),
    (((4096, 4096), torch.bfloat16, H200, torch.float32), None, "float32 activations with bfloat16 weights"),
    (((4096, 4096), torch.bfloat16, H200, torch.bfloat16, torch.float32), None, "float32 bias"),
    (((24, 64), torch.bfloat16, H200), None, "N x K = 24 x 64: cusparselt needs multiples of 16 x 16"),
    (((64, 40), torch.float16, H200), None, "multiples of 16 x 16"),
    (((64, 128), torch.bfloat16, A100_NO_CUSPARSELT), "cutlass", ""),
    (((32, 96), torch.bfloat16, A100_NO_CUSPARSELT), None, "cutlass needs multiples of 32 x 64"),
    (((16, 64), torch.bfloat16, A100_NO_CUSPARSELT), None, "multiples of 32 x 64"),
])
def test_decide(args, backend, reason):
    got, why = decide(*args)
    assert got == backend and reason in why and bool(why) == (backend is None)


# ---- the plan on pruned Programs -------------------------------------------------------------------
@pytest.fixture(scope="module")
def wanda_2of4():
    return pruned([Wanda(0.5, "2:4")])


def test_plan_takes_every_pruned_linear_of_a_half_precision_program(wanda_2of4):
    program = wanda_2of4.copy().to(dtype=torch.float16)
    decisions = plan(program, H200)
    linears = program.linears()
    assert len(decisions) == len(linears) - 1 == 14  # 2 layers x 7; the lm head is not pruned
    assert program.lm_head().node.name not in decisions
    assert {d.backend for d in decisions.values()} == {"cusparselt"}
    assert {d.backend for d in plan(program, A100_NO_CUSPARSELT).values()} == {"cutlass"}


def test_plan_gives_the_reason_per_linear(wanda_2of4):
    decisions = plan(wanda_2of4, H200)  # fp32
    assert len(decisions) == 14 and {d.reason for d in decisions.values()} == {
        "float32 weights: the 2:4 kernels are used for fp16/bf16"}
    assert {d.linear for d in decisions.values()} >= {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}


def test_plan_checks_the_weight_not_the_mark(wanda_2of4):
    program = wanda_2of4.copy().to(dtype=torch.bfloat16)
    for lin in program.linears():
        lin.node.meta.pop("sparsity", None)  # e.g. a 2:4 checkpoint loaded without llmopt's marks
    assert len([d for d in plan(program, H200).values() if d.backend]) == 14
    dense = pruned([]).to(dtype=torch.bfloat16)
    assert plan(dense, H200) == {}  # nothing 2:4, nothing marked: nothing to report
    for lin in dense.linears():
        lin.node.meta["sparsity"] = "2:4"  # a wrong mark
    reasons = {d.reason for d in plan(dense, H200).values()}
    assert reasons == {"marked '2:4': the weight is not 2:4 sparse"}


def test_plan_reports_other_patterns_as_dense():
    program = pruned([MagnitudePrune(0.5, "4:8")]).to(dtype=torch.bfloat16)
    decisions = plan(program, H200)
    assert len(decisions) == 14 and {d.reason for d in decisions.values()} == {"marked '4:8': the weight is not 2:4 sparse"}


def test_plan_leaves_quantized_linears_on_their_kernels():
    from llmopt.passes import RTN

    program = pruned([MagnitudePrune(0.5, "2:4"), RTN(4, 32)])
    decisions = plan(program, H200)
    assert len(decisions) == 14
    assert {d.reason for d in decisions.values()} == {"quantized (wq): no sparse kernel for quantized weights"}


# ---- the rewrite --------------------------------------------------------------------------------------
def test_rewrite_swaps_linears_and_leaves_the_program_alone(wanda_2of4):
    program = wanda_2of4
    decisions = plan(program, H200)
    copy = program.copy()
    linears = {lin.node.name: lin for lin in copy.linears()}
    # dense stand-ins for the compressed weights: on CPU, semi_structured_linear is then F.linear
    weights = {name: copy.get_weight(linears[name].weight).clone() for name in decisions}
    assert rewrite(copy.gm, weights) == 14
    swapped = [n for n in copy.graph.nodes if n.op == "call_function" and n.target is SPARSE_OP]
    assert len(swapped) == 14 and all(n.args[1].target.endswith("_2of4") for n in swapped)
    assert not [n for n in program.graph.nodes if n.target is SPARSE_OP]
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(run_logits(copy.gm, ids), program.run(ids), rtol=1e-5, atol=1e-5)


def test_triton_lowering_on_cpu_stays_dense_and_says_why():
    config = tiny_llama()
    calib = Calibration([torch.randint(0, config.vocab_size, (4, 32))], progress=False)
    lowered = llmopt.compile(captured(config), passes=[Wanda(0.5, "2:4")], calibration=calib, backend="triton")
    reference = llmopt.compile(lowered.program, backend="torch")
    ids = torch.randint(0, config.vocab_size, (2, 7))
    torch.testing.assert_close(lowered(ids), reference(ids), rtol=1e-4, atol=1e-4)  # fp32 kernels vs reference
    report = lowered.report()
    assert "2:4 sparse linears: 0 of 14 on torch's semi-structured kernels" in report
    assert "- kept dense, 14 x on cpu: torch's semi-structured kernels are CUDA-only" in report
    assert "2:4 sparse" not in llmopt.compile(captured(config), backend="triton").report()  # nothing pruned: no line


# ---- on the GPU ---------------------------------------------------------------------------------------
def _gpu_backend_or_skip():
    backend, why = sparse_backend(SparseDevice.of("cuda"))
    if backend is None:
        pytest.skip(f"no 2:4 kernel on this GPU: {why}")
    return backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200 machine)")
def test_semi_structured_linear_on_gpu():
    backend = _gpu_backend_or_skip()
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    w = w * prune_mask(magnitude_scores(w), pattern="2:4")  # [N, K] 2:4
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    sparse = compress(w, backend)
    x = torch.randn(3, 7, 512, device="cuda", dtype=torch.bfloat16)  # 21 rows: torch pads them to 24
    got = semi_structured_linear(x, sparse, bias)
    want = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    # bf16 output (8 bits of mantissa) of an fp32-accumulated sum: 1e-2 relative
    assert got.shape == (3, 7, 256)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def wide_config(family: str):
    """hidden 512, 8 heads of 64 (4 KV heads for Llama), MLP 1408, 2 layers, vocab 1024; OPT has biases."""
    if family == "opt":
        return tf.OPTConfig(vocab_size=1024, hidden_size=512, num_hidden_layers=2, num_attention_heads=8, ffn_dim=1408,
                            max_position_embeddings=1024, word_embed_proj_dim=512)
    return tf.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200 machine)")
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_wanda_2of4_triton_matches_torch_on_gpu(family):
    backend = _gpu_backend_or_skip()
    model = build_model(wide_config(family), dtype=torch.bfloat16).cuda()
    calib = Calibration([torch.randint(0, 1024, (4, 128), device="cuda")], progress=False)
    lowered = llmopt.compile(model, passes=[FuseAttention(), Wanda(0.5, "2:4")], calibration=calib, backend="triton")
    reference = llmopt.compile(lowered.program, backend="torch")
    n = len(lowered.program.linears()) - 1  # every linear but the lm head
    assert f"2:4 sparse linears: {n} of {n} on torch's semi-structured kernels ({backend})" in lowered.report()
    graph = lower(lowered.program).causal_gm
    swapped = [node for node in graph.graph.nodes if node.op == "call_function" and node.target is SPARSE_OP]
    assert len(swapped) == n
    assert all(isinstance(getattr(graph, node.args[1].target), torch.sparse.SparseSemiStructuredTensor) for node in swapped)
    ids = torch.randint(0, 1024, (2, 300), device="cuda")
    for pos in (None, torch.arange(300, device="cuda").expand(2, 300)):  # causal graph and masked graph
        got, want = lowered(ids, pos).float(), reference(ids, pos).float()
        # bf16 activations (8 bits of mantissa) through two layers, sums in another order: ~1e-2 relative
        rel = (got - want).norm() / want.norm()
        assert torch.isfinite(got).all() and rel < 2e-2, f"{family}: relative error {rel:.3g}"
