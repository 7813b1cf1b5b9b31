"""Lower a Program to Triton: templates for llmopt's custom ops, generated kernels for fusion groups.

Entry point: `lower(program) -> LoweredProgram`, a callable `(input_ids [B, T], position_ids=None)
-> logits [B, T, V]` that `llmopt.compile(..., backend="triton")` returns inside its CompiledModel.

The Program's function is not changed: lowering copies its graph (sharing the weights) and swaps targets:
- quantized linears reading one value (q/k/v, gate/up) -> one linear over their concatenated rows, sliced
  (`llmopt.codegen.concat_linears`; the Program's weights become views of the concatenated ones),
- `llmopt.linear_w8a8` -> one activation quantization per input (shared by q/k/v, by gate/up), which
  generated kernels fuse into the RMSNorm or SiLU·mul making the input, and the int8 tensor-core GEMM
  template per linear (scales and bias in the epilogue) (`llmopt.codegen.quantize_inputs`),
- `llmopt.linear_wq` -> the W4A16 GEMM / split-K GEMV template (groups of fewer than 32 or not a power of two
  stay on the reference op, which runs on any device: `w4a16_gemm.supports`),
- `llmopt.attention` -> the FlashAttention template (GQA without repeating K/V),
- `aten.linear` with a 2:4 sparse fp16/bf16 weight -> torch's semi-structured sparse matmul where the
  GPU has one (`llmopt.codegen.sparse`; `self.sparse` says which linears and why not the others),
- chains of pointwise ops and row reductions -> generated kernels (`llmopt.codegen.fusion`).
Two graphs are kept. When the caller gives no `position_ids`, every row holds positions 0..T-1 and the
attention mask transformers builds from them is exactly the causal mask, so the first graph calls the
causal kernel and drops the mask computation; with explicit `position_ids` (packed or shifted
sequences), the second graph keeps the mask and runs the same kernel reading it (a boolean mask; an
additive float one goes to the reference op).
On CUDA, calls go through a `runtime.cuda_graphs.GraphCache`: a shape called again is captured into a
CUDA graph and replayed when that measures faster than launching the kernels from Python
(`cuda_graphs=False` turns it off).
"""
import torch
from torch.fx import GraphModule

import llmopt.ops  # noqa: F401  (torch.ops.llmopt.*)
from llmopt.codegen.sparse import use_semi_structured
from llmopt.devices import check_triton_device


def _attention_causal(q, k, v, mask, scale, causal):
    return _attention_masked(q, k, v, None, scale, True)


def _attention_masked(q, k, v, mask, scale, causal):
    from llmopt.codegen.kernels import flash_attention
    from llmopt.codegen.kernels.flash_attention import supports

    if supports(q, k, v, mask):
        return flash_attention(q, k, v, scale, causal, mask)
    return torch.ops.llmopt.attention(q, k, v, mask, scale, causal)  # e.g. an additive float mask


def _templates(causal_positions: bool) -> dict:
    from llmopt.codegen import kernels

    return {
        torch.ops.llmopt.linear_wq.default: kernels.linear_wq,
        torch.ops.llmopt.attention.default: _attention_causal if causal_positions else _attention_masked,
    }


class LoweredProgram:
    """The Program's graph with Triton kernels in place of reference ops; see the module docstring."""

    def __init__(self, program, fuse: bool = True, cuda_graphs: bool = True, concat_linears: bool = True):
        from llmopt.runtime.cuda_graphs import GraphCache

        self.program = program
        self.causal_gm = _lowered_graph(program, causal_positions=True, fuse=fuse, concat=concat_linears)
        self.general_gm = _lowered_graph(program, causal_positions=False, fuse=fuse, concat=concat_linears)
        self.sparse = use_semi_structured(program, [self.causal_gm, self.general_gm])  # 2:4 linears (codegen/sparse.py)
        self.graphs = GraphCache(self._run) if cuda_graphs else None  # repeated shapes replay (runtime/cuda_graphs.py)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor = None) -> torch.Tensor:
        """input_ids: [B, T] (positions 0..T-1 unless `position_ids` [B, T] is given) -> logits [B, T, V]."""
        if self.graphs is not None:
            return self.graphs(input_ids, position_ids)
        return self._run(input_ids, position_ids)

    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor = None) -> torch.Tensor:
        from llmopt.program import run_logits

        if position_ids is None:
            return run_logits(self.causal_gm, input_ids)
        return run_logits(self.general_gm, input_ids, position_ids)

    def dump_kernels(self, directory) -> list:
        """Write the generated kernels' source, one file a kernel; returns the paths."""
        return dump_kernels(self.program, directory)


def lower(program, fuse: bool = True, cuda_graphs: bool = True, concat_linears: bool = True) -> LoweredProgram:
    """fuse: generated kernels for fusion groups; cuda_graphs: replay repeated shapes; concat_linears: merge
    sibling quantized linears (see the module docstring)."""
    check_triton_device(program, "llmopt.codegen.lower")
    return LoweredProgram(program, fuse=fuse, cuda_graphs=cuda_graphs, concat_linears=concat_linears)


def dump_kernels(program, directory) -> list:
    """Write the kernels lowering generates for `program` (those of its causal graph: the general one
    differs only in attention) as `<directory>/<group name>.py`; returns the paths."""
    from llmopt.codegen import fusion

    return fusion.dump_kernels(_lowered_graph(program, causal_positions=True, fuse=False, generated=True), directory)


def _lowered_graph(program, causal_positions: bool, fuse: bool, generated: bool = None,
                   concat: bool = True) -> GraphModule:
    """The lowered graph, its fusion groups as generated kernels when `fuse`; `generated` (default:
    `fuse`) writes activation quantization as ATen ops for the fusion partitioner to take; `concat` merges
    sibling quantized linears."""
    from llmopt.codegen.concat_linears import concat_sibling_linears
    from llmopt.codegen.quantize_inputs import split_w8a8

    graph = torch.fx.Graph()
    out = graph.graph_copy(program.graph, {})
    graph.output(out)
    gm = GraphModule(program.gm, graph)  # shares the Program's weights
    if concat:
        concat_sibling_linears(gm, program.gm)
    templates = _templates(causal_positions)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in templates and _has_kernel(node):
            if causal_positions and node.target == torch.ops.llmopt.attention.default:
                node.args = node.args[:3] + (None,) + node.args[4:]  # the mask is exactly causal here
            node.target = templates[node.target]
    split_w8a8(gm, generated=fuse if generated is None else generated)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    if fuse:
        gm = _fuse_pointwise(gm)
    return gm


def _has_kernel(node) -> bool:
    """Whether the template takes this call: every attention does; a `linear_wq` if its format suits the kernels."""
    if node.target != torch.ops.llmopt.linear_wq.default:
        return True
    from llmopt.codegen.kernels.w4a16_gemm import supports

    group_size, bits = node.args[5], node.args[6]
    return supports(group_size, bits)


def _fuse_pointwise(gm: GraphModule) -> GraphModule:
    try:
        from llmopt.codegen.fusion import fuse_graph_module
    except ImportError:
        return gm
    return fuse_graph_module(gm)
