"""Quantized linears that read one value, merged into one linear over their weights' rows: q/k/v, gate/up.

Entry point: `concat_sibling_linears(gm, root) -> int` (how many merged linears it wrote); `llmopt.codegen.lower`
calls it on its copy of the Program's graph, with the Program's module as `root`.

Why: at decode sizes (a few rows of x) a linear is a GEMV whose time is mostly latency (the first loads, the last
wave of programs, the launch; `benchmarks/RESULTS.md`), so three 4096-row calls cost more than one of 12288 rows.
Linears merge when they are the same op (`llmopt.linear_wq` or `llmopt.linear_w8a8`) on the same input node with
the same non-weight arguments (group size and bits; the same activation scale node) and weights of one dtype and
width. The merged linear reads weights concatenated along N (dim 0 of the weight, its scales, zero points and bias)
and each original output becomes a slice of its output's last dim (a view: the kernels after it read strides).
Each row of the result is computed as before; only the kernel's choice of config (and so the order of its fp32
sums) may change with the larger N.

No memory is added: the Program's own weights become row views of the concatenated tensors, so the torch backend,
`llmopt.save` (which stores views as copies) and the other lowered graph (which finds them back to back and takes
them as they are) all read the same bytes. Float `aten.linear`s are left alone: their weights are usually the
user's model's own parameters (capture shares them), which a concatenated copy would double while the model lives.
"""
from collections import defaultdict

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch.fx import GraphModule, Node

import llmopt.ops  # noqa: F401  (torch.ops.llmopt.*)

aten = torch.ops.aten
# op -> positions of its row arguments (dim 0 = N: weight, scales, zero points, bias); the rest must match
ROW_ARGS = {
    torch.ops.llmopt.linear_wq.default: (1, 2, 3, 4),  # (x, qweight, scales, zeros, bias, group_size, bits)
    torch.ops.llmopt.linear_w8a8.default: (1, 2, 3),  # (x, weight, weight_scale, bias, act_scale)
}


def concat_sibling_linears(gm: GraphModule, root: torch.nn.Module) -> int:
    """Merge the sibling quantized linears of `gm` (see the module docstring); `root` holds the weights that
    `gm` was built from (the Program's module), re-pointed to views of the merged ones. Returns the merged count."""
    merged = 0
    for siblings in _sibling_groups(gm).values():
        if len(siblings) > 1:
            _merge(gm, root, siblings)
            merged += 1
    if merged:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return merged


def _sibling_groups(gm: GraphModule) -> dict:
    """{key: [linear nodes in graph order]}: the linears that may merge share a key."""
    groups = defaultdict(list)
    for node in gm.graph.nodes:
        rows = ROW_ARGS.get(node.target) if node.op == "call_function" else None
        if rows is None or node.kwargs or len(node.args) <= max(rows) or "val" not in node.meta:
            continue
        row_args = [node.args[i] for i in rows]
        if not all(a is None or (isinstance(a, Node) and a.op == "get_attr") for a in row_args):
            continue
        tensors = [None if a is None else getattr(gm, a.target) for a in row_args]
        layout = tuple(None if t is None else (t.dtype, t.device, tuple(t.shape[1:])) for t in tensors)
        others = tuple(a for i, a in enumerate(node.args) if i not in rows)
        groups[node.target, others, layout].append(node)
    return groups


def _merge(gm: GraphModule, root: torch.nn.Module, siblings: list) -> None:
    """Replace `siblings` by one linear over their concatenated rows, each sibling's users reading a slice."""
    first = siblings[0]
    rows = ROW_ARGS[first.target]
    args = list(first.args)
    with gm.graph.inserting_before(first):
        for i in rows:
            if first.args[i] is None:
                continue
            targets = [node.args[i].target for node in siblings]
            args[i] = gm.graph.get_attr(_concatenated(gm, root, targets))
        merged = gm.graph.call_function(first.target, tuple(args))
    widths = [node.meta["val"].shape[-1] for node in siblings]
    with first.meta["val"].fake_mode, enable_python_dispatcher():
        merged.meta["val"] = torch.cat([node.meta["val"] for node in siblings], dim=-1)  # fake [..., ΣN]
    start = 0
    for node, width in zip(siblings, widths):
        with gm.graph.inserting_after(merged):
            part = gm.graph.call_function(aten.slice.Tensor, (merged, -1, start, start + width))
        part.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(part)
        gm.graph.erase_node(node)
        start += width


def _concatenated(gm: GraphModule, root: torch.nn.Module, targets: list) -> str:
    """The name, on `gm`, of the weights `targets` concatenated along dim 0. Where they already lie back to back
    in one tensor (a lowering before this one merged them), that tensor; else a new one, and the weights of
    `root` and `gm` become its row views."""
    parts = [getattr(gm, t) for t in targets]
    whole = _back_to_back(parts)
    if whole is None:
        whole = torch.cat(parts, dim=0)
        start = 0
        for target, part in zip(targets, parts):
            view = whole[start:start + part.shape[0]]
            for module in (root, gm):
                if hasattr(module, target):
                    _set_tensor(module, target, view)
            start += part.shape[0]
    name, i = f"{targets[0]}_merged", 1
    while hasattr(gm, name):
        name, i = f"{targets[0]}_merged_{i}", i + 1
    gm.register_buffer(name, whole)
    return name


def _back_to_back(parts: list):
    """The one tensor that `parts` (contiguous, same dtype) are consecutive row ranges of, or None."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        if not part.is_contiguous() or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or part.storage_offset() != offset:
            return None
        offset += part.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _set_tensor(module: torch.nn.Module, target: str, tensor: torch.Tensor) -> None:
    """Point `module`'s (possibly dotted) attribute `target` at `tensor`, as a buffer."""
    *path, leaf = target.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        del owner._parameters[leaf]
    owner.register_buffer(leaf, tensor)
