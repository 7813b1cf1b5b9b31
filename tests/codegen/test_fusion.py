"""Generated fusion kernels (`llmopt.codegen.fusion`): what the partitioner groups, and fused Programs
against the eager ones.

On CPU the kernels run under the Triton interpreter (tests/codegen/conftest.py) on tiny configs in
fp32 and fp16; the bf16 check of a Llama-shaped layer is a `gpu` test. Outputs start as NaN (the
`poison` fixture), so an element a kernel forgets to write shows in the logits. A generated kernel compiled for
sm_90 lets the next kernel start and waits for the previous one before any memory access (`pdl.py`).
"""
import ast

import networkx as nx
import pytest
import torch
import transformers as tf
from torch.export import Dim

import llmopt
from llmopt.codegen.fusion import dump_kernels, fuse, fuse_graph_module, partition
from llmopt.roles import linear_parts, through_layout
from llmopt.testing import build_model
from tests.codegen.sm90_compile import compile_job

aten = torch.ops.aten
MAX_POS = 128
ROPE = {"rope_type": "default", "rope_theta": 10_000.0}

# Fused vs eager logits. fp32: kernels compute every op in fp32 as eager does; what differs is the
# summation order of reductions and the approximations of rsqrt/exp, a few fp32 ulps a layer, so logits
# of O(1) agree to 1e-5. fp16: each value is rounded to fp16 after its op, as eager rounds it, so a
# difference needs one of those ulp-level changes to flip a rounding (2^-11 relative), then carried
# through the layers: 1e-2 is a wide bound for it (seen: bit-equal on these configs).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def tiny(family: str):
    """A small config of the family with the features fusion must handle."""
    common = dict(vocab_size=96, max_position_embeddings=MAX_POS, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if family == "llama":  # GQA; the config of the brief
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, rope_parameters=ROPE, **common)
    if family == "gemma":  # embedding scale, RMSNorm with 1 + w, tanh-approximate GELU gate
        return tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, rope_parameters=ROPE, **common)
    if family == "gpt_neox":  # LayerNorm, exact GELU, partial rotary on a chunk of fused qkv, parallel residual
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                rope_parameters={**ROPE, "partial_rotary_factor": 0.5}, use_parallel_residual=True, **common)
    if family == "phi3":  # fused qkv and gate_up (chunk), partial rotary
        return tf.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, original_max_position_embeddings=MAX_POS,
                             rope_parameters={**ROPE, "partial_rotary_factor": 0.5}, **common)
    if family == "gpt2":  # LayerNorm, tanh GELU written out (pow, tanh, mul)
        return tf.GPT2Config(vocab_size=96, n_embd=32, n_inner=64, n_layer=2, n_head=2, n_positions=MAX_POS,
                             bos_token_id=0, eos_token_id=1)
    raise ValueError(family)


_PROGRAMS = {}

# Every generated kernel of the tiny Llama, compiled for sm_90 with PDL on (in a child process: this suite runs
# Triton's interpreter, which does not compile): the first memory instructions in each kernel's PTX.
_COMPILE_FOR_SM90 = """
import json
import re
import sys
import torch
import triton
from llmopt.codegen.fusion import partition
from llmopt.codegen.fusion.emit import block_size, emit
from llmopt.codegen.fusion.loader import load
from tests.codegen.sm90_compile import compile_triton_for_sm90
from tests.codegen.test_fusion import program_of

orders = {}
for group in partition(program_of("llama", torch.float16).graph):
    module = sys.modules[load(emit(group)).__module__]
    kernel = next(v for v in vars(module).values() if isinstance(v, triton.runtime.JITFunction))
    pointers = {name: "*fp16" for name in kernel.arg_names if name.endswith("_ptr")}
    compiled = compile_triton_for_sm90(kernel, pointers, {"ROWS": 1, "BLOCK": block_size(group), "PDL": True}, ())
    orders[group.name] = re.findall(r"griddepcontrol[.][a-z_]+|ld[.]global|st[.]global", compiled.asm["ptx"])[:3]
print(json.dumps(orders))
"""
BACKGROUND = {"test_generated_kernels_launch_dependents_then_wait_before_touching_memory": compile_job(_COMPILE_FOR_SM90)}


def program_of(family: str, dtype=torch.float32):
    """Captured once a test session: capture takes seconds, tests only read the Program."""
    if (family, dtype) not in _PROGRAMS:
        _PROGRAMS[family, dtype] = llmopt.capture(build_model(tiny(family), dtype=dtype))
    return _PROGRAMS[family, dtype]


def groups_with(groups, target):
    return [g for g in groups if any(n.target == target for n in g.nodes)]


# ---- partition ---------------------------------------------------------------------------------------


def test_llama_partition():
    program = program_of("llama")
    groups = partition(program.graph)
    assert len(groups) == 12, [g.name for g in groups]

    norms = program.norms()  # 2 layers x 2 + the final norm
    assert len(norms) == 5
    norm_groups = [next(g for g in groups if norm.node in g.nodes) for norm in norms]
    assert len({id(g) for g in norm_groups}) == 5 and all(g.kind == "mean" for g in norm_groups)
    # every norm but the first (on the embedding) fuses the residual add in front of it
    with_residual = [g for g in norm_groups if any(_is_residual_add(n) for n in g.nodes)]
    assert with_residual == norm_groups[1:]

    silu = groups_with(groups, aten.silu.default)
    assert len(silu) == 2
    assert all([n.target for n in g.nodes] == [aten.silu.default, aten.mul.Tensor] and len(g.outputs) == 1 for g in silu)

    rope = [g for g in groups if {aten.neg.default, aten.cat.default, aten.slice.Tensor} <= {n.target for n in g.nodes}]
    assert len(rope) == 4  # q and k of 2 layers, rotate_half inside
    assert all(len(g.outputs) == 1 and g.kind == "pointwise" for g in rope)
    assert len(groups_with(groups, aten.cos.default)) == 1  # the cos/sin table


def _is_residual_add(node) -> bool:
    """An add of a linear's output (through views: GPT-2 reshapes it) and the residual stream."""
    return node.target == aten.add.Tensor and any(linear_parts(through_layout(a)) for a in node.args if isinstance(a, torch.fx.Node))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_gelu_and_layernorm_groups(family):
    program = program_of(family)
    groups = partition(program.graph)
    layers = program.config.get("n_layer", program.config.get("num_hidden_layers"))
    gelu_op = aten.tanh.default if family == "gpt2" else aten.gelu.default
    gelu = groups_with(groups, gelu_op)
    assert len(gelu) == layers and all(g.kind == "pointwise" and len(g.outputs) == 1 for g in gelu)
    if family == "gpt2":  # gelu_new written out: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), one kernel
        assert all({aten.pow.Tensor_Scalar, aten.tanh.default, aten.mul.Tensor, aten.add.Tensor} <= {n.target for n in g.nodes}
                   for g in gelu)
    norms = groups_with(groups, aten.layer_norm.default)
    assert len(norms) == len(program.norms()) and all(g.kind == "layer_norm" for g in norms)
    assert any(_is_residual_add(n) for g in norms for n in g.nodes)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_neox", "phi3", "gpt2"])
def test_groups_are_convex(family):
    """No group both feeds and consumes an outside node (one call can replace it)."""
    graph = program_of(family).graph
    dag = nx.DiGraph([(a, n) for n in graph.nodes for a in n.all_input_nodes])
    for group in partition(graph):
        members = set(group.nodes)
        below = set().union(*(nx.descendants(dag, n) for n in members)) - members
        above = set().union(*(nx.ancestors(dag, n) for n in members)) - members
        assert not below & above, f"{group.name} goes out and back through {sorted(n.name for n in below & above)}"


# ---- fused Programs against eager ---------------------------------------------------------------------


@pytest.mark.parametrize("family, dtype", [
    ("llama", torch.float32), ("gemma", torch.float32), ("gpt_neox", torch.float32), ("phi3", torch.float32),
    ("llama", torch.float16),
], ids=["llama-fp32", "gemma-fp32", "gpt_neox-fp32", "phi3-fp32", "llama-fp16"])
def test_fused_program_matches_eager(poison, family, dtype):
    program = program_of(family, dtype)
    fused = fuse(program)
    assert len(fused.groups) >= 4
    for batch, tokens in ((2, 7), (1, 3)):  # one capture, any batch and length
        ids = torch.randint(0, 96, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
        got, want = fused(ids), program(ids)
        assert torch.isfinite(got).all(), "NaN in the logits: a kernel left part of an output unwritten"
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_fused_graph_calls_one_launcher_per_group():
    program = program_of("llama")
    fused = fuse(program)
    calls = [n for n in fused.gm.graph.nodes if "fusion_group" in n.meta]
    assert sorted(n.meta["fusion_group"] for n in calls) == sorted(g.name for g in fused.groups)
    covered = {n.name for g in fused.groups for n in g.nodes}
    left = {n.name for n in fused.gm.graph.nodes if n.op == "call_function"}
    outputs = {o.name for g in fused.groups for o in g.outputs}
    assert covered & left <= outputs  # only outputs' names come back (as the launchers' results)
    assert program.graph is not fused.gm.graph and len(partition(program.graph)) == len(fused.groups)


def test_dump_kernels(tmp_path):
    program = program_of("llama")
    fused = fuse(program)
    paths = dump_kernels(program, tmp_path)
    assert len(paths) == len(fused.groups) == len(set(paths))
    for path, group in zip(paths, fused.groups):
        text = path.read_text()
        tree = ast.parse(text)
        functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        kernels = [f for f in functions.values() if any(getattr(d, "attr", "") == "jit" for d in f.decorator_list)]
        assert len(kernels) == 1 and group.name in functions
        assert {"ROWS", "BLOCK"} <= {a.arg for a in kernels[0].args.args}
        docstring = ast.get_docstring(tree)
        for node in group.nodes:
            assert f"  {node.name}: {node.target}" in docstring
    assert [p.read_text() for p in paths] == [s.text for s in fused.sources]  # the code that runs


def test_dump_kernels_to_a_file_is_refused_by_name(tmp_path):
    taken = tmp_path / "taken.py"
    taken.write_text("# the user's file\n")
    with pytest.raises(llmopt.LlmoptError, match=rf"dump_kernels: {taken} is a file; give a directory"):
        dump_kernels(program_of("llama"), taken)
    assert taken.read_text() == "# the user's file\n"


# ---- graph features models do not all show ---------------------------------------------------------


class Softmaxish(torch.nn.Module):
    """Two reductions in one kernel (a softmax), where with a bool mask, clamp, a row output, a narrower slice."""

    def forward(self, x, mask):  # x: [B, T, K], mask: [B, T, K] bool
        e = torch.exp(x - x.amax(-1, keepdim=True))
        s = e.sum(-1, keepdim=True)  # [B, T, 1]
        y = torch.where(mask, e / s, -x.clamp(-1.0, 1.0))
        return y, s, torch.relu(y[..., 3:]) + 1  # [B, T, K - 3]


class WidePointwise(torch.nn.Module):
    """Column blocks (K > 1024, not a multiple of BLOCK), a [K] weight, a 0-d buffer, a [B, T, 1] input."""

    def __init__(self, k: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(k))
        self.register_buffer("c", torch.tensor(0.5))

    def forward(self, x, row_scale):  # x: [B, T, K], row_scale: [B, T, 1]
        return torch.nn.functional.gelu(x) * self.w - torch.sigmoid(x) * self.c * row_scale


def _export(module, args):
    rows = {0: Dim("b", min=1, max=64), 1: Dim("t", min=1, max=64)}
    return torch.export.export(module, args, dynamic_shapes=tuple(rows for _ in args)).module()


def test_generated_kernels_launch_dependents_then_wait_before_touching_memory():
    """Programmatic dependent launch (codegen/kernels/pdl.py): in the PTX of each of the tiny Llama's generated
    kernels, the next kernel is let in first, then the kernel waits for the previous one, then it loads."""
    import json

    done = BACKGROUND["test_generated_kernels_launch_dependents_then_wait_before_touching_memory"].result()
    assert done.returncode == 0, done.stderr[-3000:]
    orders = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(orders) == 12  # test_llama_partition's groups
    for name, order in orders.items():
        assert order == ["griddepcontrol.launch_dependents", "griddepcontrol.wait", "ld.global"], name


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # masked-off rows divide 0 by 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_reductions_where_and_slices(poison, dtype):
    module = Softmaxish()
    x, mask = torch.randn(2, 5, 40, dtype=dtype), torch.rand(2, 5, 40) > 0.5
    gm = _export(module, (x, mask))
    assert sorted(g.kind for g in partition(gm.graph)) == ["amax_sum", "pointwise"]
    fused = fuse_graph_module(gm)
    for shape in ((2, 5), (3, 1)):
        x, mask = torch.randn(*shape, 40, dtype=dtype), torch.rand(*shape, 40) > 0.5
        for got, want in zip(fused(x, mask), module(x, mask)):
            assert got.shape == want.shape and torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_wide_rows_strided_inputs(poison):
    module = WidePointwise(1500)
    gm = _export(module, (torch.randn(2, 5, 1500), torch.randn(2, 5, 1)))
    fused = fuse_graph_module(gm)
    x = torch.randn(1500, 3, 4).permute(1, 2, 0)  # [3, 4, 1500], last dim not contiguous: copied
    row_scale = torch.randn(4, 3, 1).transpose(0, 1)  # [3, 4, 1], strided rows: read in place
    (got,) = fused(x, row_scale)
    with torch.no_grad():
        want = module(x, row_scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- GPU ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run with -m gpu on the H200")
def test_fused_llama_layer_bf16_gpu(poison):
    """A Llama-7B-shaped layer (hidden 4096, SiLU MLP 11008, 32 heads, GQA 8) in bf16, 600 tokens.

    Kernels round every op's result to bf16 as eager does; only rsqrt/exp approximations and summation
    order differ, flipping a few roundings (2^-8 relative) in one layer: well under 1e-2 overall."""
    config = tf.LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1024, rope_parameters=ROPE)
    program = llmopt.capture(build_model(config, dtype=torch.bfloat16).cuda())
    fused = fuse(program)
    assert sorted(g.kind for g in fused.groups).count("mean") == 3
    ids = torch.randint(0, 1024, (2, 300), device="cuda")
    got, want = fused(ids).float(), program(ids).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert torch.isfinite(got).all() and rel < 1e-2, f"relative error {rel:.3g}"
