"""2:4 sparse linears on torch's semi-structured sparse kernels (cuSPARSELt / CUTLASS), where the GPU has them.

Entry point: `use_semi_structured(program, graph_modules) -> SparseLinears`; `LoweredProgram` calls it
on its two lowered graphs, and `CompiledModel.report()` prints `SparseLinears.summary()`. The op itself:
`compress(w, backend)` then `semi_structured_linear(x, compressed, bias)` (benchmarks/bench_sparse.py).

A linear goes sparse when all of these hold, else it stays on the dense matmul and the reason is kept:
- it is a dense `aten.linear` whose weight is 2:4 sparse, checked on the tensor itself
  (`is_2_4_sparse`). The prune passes' `meta["sparsity"]` mark is not trusted for that; it only makes a
  linear worth reporting when its weight is not 2:4 (a "4:8" or "unstructured" mark);
- the weight is on a CUDA GPU where torch has a kernel: cuSPARSELt on compute capability 8.x and 9.x
  when torch was built with it, else torch's CUTLASS kernel, which runs on 8.x only (the backends
  torch's own tests run on each capability; ROCm and newer capabilities stay dense);
- weight, activations and bias are all fp16 or all bf16;
- N and K are multiples of the backend's minimum sparse block for the dtype, read from torch
  (`_DTYPE_SHAPE_CONSTRAINTS`: fp16/bf16 16 x 16 for cuSPARSELt, 32 x 64 for CUTLASS). The tokens
  need no condition: torch pads the activation rows to a multiple of 8.
`decide` is that rule as a pure function of shapes, dtypes and a `SparseDevice`, so it is tested on CPU.

The Program is not changed (it shares its weights with the lowering, `save` and the torch backend):
each sparse linear's compressed weight (the kept half of the values plus 2-bit indices, about 56% of
the dense bytes) is a buffer of the lowered graph modules, one copy for both graphs, read by
`semi_structured_linear` in place of `aten.linear`. So a lowered 2:4 model holds both copies.

Quantized linears stay on their quantized kernels: 2:4 + AWQ/RTN keeps the int4 weights on the W4A16
template and 2:4 + W8A8 the int8 GEMM. The zeros survive quantization exactly (a zero weight
dequantizes to 0), but no sparse kernel takes int4 groups, and torch's int8 2:4 matmul has no per-token
scale epilogue; such linears are reported as kept dense with that reason.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import GraphModule

from llmopt.errors import LlmoptError
from llmopt.passes.compress.prune import is_2_4_sparse

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _backend_classes() -> dict:
    return {
        "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
        "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
    }


@dataclass(frozen=True)
class SparseDevice:
    """What decides which of torch's 2:4 kernels a device has."""

    type: str  # "cuda", "cpu", "hip" (ROCm), ...
    capability: tuple = ()  # (major, minor) on CUDA
    cusparselt: bool = False  # torch.backends.cusparselt.is_available()

    @classmethod
    def of(cls, device) -> "SparseDevice":
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device.type)
        if torch.version.hip is not None:
            return cls("hip")
        return cls("cuda", tuple(torch.cuda.get_device_capability(device)), torch.backends.cusparselt.is_available())


def sparse_backend(device: SparseDevice) -> tuple:
    """-> ("cusparselt" | "cutlass", "") or (None, why the device has no 2:4 kernel)."""
    if device.type != "cuda":
        return None, f"on {device.type}: torch's semi-structured kernels are CUDA-only"
    major, minor = device.capability
    if device.cusparselt and major in (8, 9):
        return "cusparselt", ""
    if major == 8:
        return "cutlass", ""
    if major == 9:
        return None, f"compute capability {major}.{minor} without cuSPARSELt: torch's CUTLASS 2:4 kernel runs on 8.x only"
    return None, f"compute capability {major}.{minor}: torch's 2:4 kernels run on 8.x (CUTLASS, cuSPARSELt), 9.x (cuSPARSELt)"


def decide(shape: tuple, dtype: torch.dtype, device: SparseDevice, input_dtype: torch.dtype = None,
           bias_dtype: torch.dtype = None) -> tuple:
    """For a 2:4-sparse weight [N, K]: -> (backend, "") when torch can run `x @ Wᵀ + b` on it, else (None, reason)."""
    backend, why = sparse_backend(device)
    if backend is None:
        return None, why
    if dtype not in HALF_DTYPES:
        return None, f"{_name(dtype)} weights: the 2:4 kernels are used for fp16/bf16"
    for what, other in (("activations", input_dtype), ("bias", bias_dtype)):
        if other is not None and other != dtype:
            return None, f"{_name(other)} {what} with {_name(dtype)} weights: the 2:4 kernels need one dtype"
    limits = _backend_classes()[backend]._DTYPE_SHAPE_CONSTRAINTS[dtype]
    rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
    n, k = shape
    if n % rows or k % cols:
        return None, f"N x K = {n} x {k}: {backend} needs multiples of {rows} x {cols} for {_name(dtype)}"
    return backend, ""


@dataclass(frozen=True)
class Decision:
    """One linear's outcome: the backend it runs on, or None and why it stays dense."""

    linear: str  # the linear's name (its weight's, without ".weight")
    backend: Optional[str]
    reason: str = ""


def plan(program, device: SparseDevice) -> dict:
    """{linear node name: Decision} for every linear whose weight is 2:4 sparse or that a prune pass marked."""
    decisions = {}
    for lin in program.linears():
        marked = lin.node.meta.get("sparsity")
        if lin.kind != "dense":
            if marked:
                why = f"quantized ({lin.kind}): no sparse kernel for quantized weights"
                decisions[lin.node.name] = Decision(lin.name, None, why)
            continue
        w = program.get_weight(lin.weight)  # [N, K]
        if not is_2_4_sparse(w):
            if marked:
                decisions[lin.node.name] = Decision(lin.name, None, f"marked {marked!r}: the weight is not 2:4 sparse")
            continue
        bias_dtype = program.dtype(lin.bias) if lin.bias is not None else None
        backend, why = decide(tuple(w.shape), w.dtype, device, program.dtype(lin.input), bias_dtype)
        decisions[lin.node.name] = Decision(lin.name, backend, why)
    return decisions


def compress(w: torch.Tensor, backend: str) -> torch.Tensor:
    """w: [N, K] 2:4 sparse fp16/bf16 on CUDA -> torch's compressed tensor for `backend` ("cusparselt" or
    "cutlass"), the weight `semi_structured_linear` takes."""
    return _backend_classes()[backend].from_dense(w.contiguous())


def semi_structured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
    """x: [..., K], weight: torch's compressed 2:4 [N, K], bias: [N] or None -> [..., N]."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    y = torch.nn.functional.linear(x2, weight, bias)  # [M, N]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def rewrite(gm: GraphModule, weights: dict) -> int:
    """Point each `aten.linear` named in `weights` ({node name: weight}) at `semi_structured_linear` with
    that weight, registered as a buffer of `gm`; -> how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default or node.name not in weights:
            continue
        dense = node.args[1]  # get_attr of the dense weight
        name, i = f"{dense.target}_2of4", 1
        while hasattr(gm, name):
            name, i = f"{dense.target}_2of4_{i}", i + 1
        gm.register_buffer(name, weights[node.name], persistent=False)
        with gm.graph.inserting_before(node):
            getter = gm.graph.get_attr(name)
        getter.meta = dict(dense.meta)  # the dense weight's shape and dtype
        node.target = semi_structured_linear
        node.args = (node.args[0], getter, *node.args[2:])
        if not dense.users:
            gm.graph.erase_node(dense)
        count += 1
    if count:
        gm.recompile()
    return count


@dataclass
class SparseLinears:
    """What `use_semi_structured` did: a Decision for every 2:4 or prune-marked linear."""

    decisions: dict  # {linear node name: Decision}

    @property
    def sparse(self) -> list:
        """Names of the linears that run on a 2:4 kernel."""
        return [d.linear for d in self.decisions.values() if d.backend is not None]

    def reasons(self) -> dict:
        """{why a linear stayed dense: how many}."""
        counts = {}
        for d in self.decisions.values():
            if d.backend is None:
                counts[d.reason] = counts.get(d.reason, 0) + 1
        return counts

    def summary(self) -> str:
        """Two lines for the compile report; empty when no linear is 2:4 or marked sparse."""
        if not self.decisions:
            return ""
        backends = sorted({d.backend for d in self.decisions.values() if d.backend is not None})
        via = f" ({', '.join(backends)})" if backends else ""
        lines = [f"2:4 sparse linears: {len(self.sparse)} of {len(self.decisions)} on torch's semi-structured kernels{via}"]
        lines += [f"- kept dense, {n} x {reason}" for reason, n in self.reasons().items()]
        return "\n".join(lines)


def use_semi_structured(program, graph_modules: list, device: SparseDevice = None) -> SparseLinears:
    """Decide (see the module docstring), compress the sparse linears' weights once, rewrite every graph."""
    device = device or SparseDevice.of(program.device)
    decisions = plan(program, device)
    nodes = {lin.node.name: lin for lin in program.linears()}
    weights = {  # {linear node name: compressed weight}, shared by every graph
        name: compress(program.get_weight(nodes[name].weight), d.backend)
        for name, d in decisions.items()
        if d.backend is not None
    }
    for gm in graph_modules:
        found = rewrite(gm, weights)
        if found != len(weights):
            raise LlmoptError(f"2:4 lowering: found {found} of the {len(weights)} sparse linears in a lowered graph (a bug)")
    return SparseLinears(decisions)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
