"""Triton source for a fusion group: a module with one `@triton.jit` kernel and its launcher.

Entry point: `emit(group) -> KernelSource` (`.name`, `.text`: the module's source, `.launcher`: the
name of the launcher function in it).

- kernel: ROWS rows x BLOCK columns of the group's iteration space `[*lead, K]` a program (leading
  dims flattened to M rows, a row index split back into leading indices for strided inputs), fp32
  math, masked loads and stores (`tiles.py` writes the body). CAPS constexprs: ROWS, BLOCK.
  A group with a reduction or a row output (`[*lead, 1]`) holds whole rows: BLOCK = next power of
  two >= its widest value, one column block. Others tile the columns: BLOCK = min(next power of two
  >= K, 1024).
- launcher `<group name>(x0, x1, ...)`: leading dims from the inputs at run time (dynamic batch and
  tokens), inputs viewed with their last dim contiguous (`.contiguous()` only when it is not), outputs
  allocated contiguous `[*lead, K]` (or `[*lead, 1]`), one launch; returns one tensor or a tuple.
  On sm_90+ the launch uses programmatic dependent launch (`codegen/kernels/pdl.py`): the kernel lets the
  next one start, then waits for the previous one before touching memory.
- module docstring: the fx nodes covered, their ATen ops and the kernel values they became.
The kernel's name carries a hash of its text, so identical groups share a name and a compiled binary.
"""
import hashlib
from dataclasses import dataclass

import triton

from llmopt.codegen.fusion.partition import FusionGroup, padded_lead, shape, width
from llmopt.codegen.fusion.tiles import KernelBody

MAX_POINTWISE_BLOCK = 1024


@dataclass(frozen=True)
class KernelSource:
    name: str  # the group's name, also the module's file stem
    launcher: str  # the launcher function's name in the module
    text: str  # the module's source


def block_size(group: FusionGroup) -> int:
    """BLOCK: whole rows (a reduction, a row output), else column tiles of at most 1024."""
    if group.whole_rows:
        return triton.next_power_of_2(group.max_width)
    return min(triton.next_power_of_2(group.width), MAX_POINTWISE_BLOCK)


def emit(group: FusionGroup) -> KernelSource:
    body = KernelBody(group)
    kernel = _kernel_text(group, body)
    kernel_name = f"{group.kind}_kernel_{hashlib.sha256(kernel.encode()).hexdigest()[:8]}"
    kernel = kernel.replace("KERNEL_NAME", kernel_name, 1)
    text = "\n".join([
        _docstring(group, body),
        "import math",
        "",
        "import torch",
        "import triton",
        "import triton.language as tl",
        "from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait",
        "",
        "from llmopt.codegen.fusion.runtime import col_view, launch_config, row_view",
        "from llmopt.codegen.kernels.pdl import launch_options",
        "",
        "",
        kernel,
        "",
        "",
        _launcher_text(group, body, kernel_name),
    ])
    return KernelSource(group.name, group.name, text)


def _kernel_text(group: FusionGroup, body: KernelBody) -> str:
    lead_count = len(group.lead)
    inputs = [f"x{i}_ptr,  # {_generic_shape(x, group)} {_dtype_name(x)}" for i, x in enumerate(group.inputs)]
    outputs = [f"out{j}_ptr,  # {_generic_shape(o, group)} {_dtype_name(o)}" for j, o in enumerate(group.outputs)]
    strided = any(body.row_dims.values())
    sizes = ["M,"] + ([f"L{d}," for d in range(1, lead_count)] if strided else [])
    strides = [f"x{i}_s{d}," for x, i in body.inputs.items() for d in body.row_dims[x]]
    header = [
        "@triton.jit",
        "def KERNEL_NAME(",
        "    # inputs",
        *("    " + line for line in inputs),
        "    # outputs, contiguous",
        *("    " + line for line in outputs),
        f"    # M rows ({'x'.join(f'L{d}' for d in range(lead_count)) or '1'}), the leading dims a row index splits into",
        "    " + " ".join(sizes),
    ]
    if strides:
        header += ["    # strides of the leading dims each input varies along", "    " + " ".join(strides)]
    header += [
        "    ROWS: tl.constexpr, BLOCK: tl.constexpr,",
        "    PDL: tl.constexpr,  # programmatic dependent launch (llmopt/codegen/kernels/pdl.py)",
        "):",
        "    if PDL:  # the next kernel may start now; nothing is read or written before the previous one has finished",
        "        gdc_launch_dependents()",
        "        gdc_wait()",
        "    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]",
        "    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]",
        "    rmask = rows < M",
    ]
    if strided:
        used = {d for dims in body.row_dims.values() for d in dims}
        header += ["    " + line for line in _split_rows(lead_count, used)]
    return "\n".join(header + ["    " + line for line in body.lines])


def _split_rows(lead_count: int, used: set) -> list:
    """Statements giving the leading indices i<d> (d in `used`) of each row, row-major over L0, L1, ..."""
    if lead_count == 1:
        return ["i0 = rows"]
    lines, rest = [], "rows"
    for d in range(lead_count - 1, 0, -1):
        if d in used:
            lines.append(f"i{d} = {rest} % L{d}")
        if not any(u < d for u in used):
            break
        quotient = "i0" if d == 1 else "rest"
        lines.append(f"{quotient} = {rest} // L{d}")
        rest = quotient
    return lines


def _launcher_text(group: FusionGroup, body: KernelBody, kernel_name: str) -> str:
    args = [f"x{i}" for i in range(len(group.inputs))]
    rank = len(group.lead) + 1
    reference = next((f"x{i}" for i, x in enumerate(group.inputs) if len(shape(x)) == rank and padded_lead(x, rank) == group.lead), None)
    if reference:
        lead = f"lead = {reference}.shape[:-1]"
    else:  # no input spans the whole row space: broadcast them (the ones pin the rank)
        shapes = [f"x{i}.shape[:-1]" for x, i in body.inputs.items() if body.row_dims[x]] + [repr((1,) * len(group.lead))]
        lead = f"lead = torch.broadcast_shapes({', '.join(shapes)})"
    lines = [
        f"def {group.name}({', '.join(args)}):",
        f'    """{group.kind} group of {len(group.nodes)} nodes -> {", ".join(o.name for o in group.outputs)}; see the module docstring."""',
        f"    {lead}  # {_dims(group.lead)}",
        "    rows = math.prod(lead)",
    ]
    for x, i in body.inputs.items():
        view = f"row_view(x{i}, lead)" if body.row_dims[x] else f"col_view(x{i})"
        lines.append(f"    x{i} = {view}  # {_dims(shape(x))}")
    outs = []
    for j, out in enumerate(group.outputs):
        last = 1 if width(out) == 1 else group.width
        lines.append(f"    out{j} = torch.empty((*lead, {last}), dtype={out.meta['val'].dtype}, device=x0.device)  # {out.name}")
        outs.append(f"out{j}")
    block = block_size(group)
    columns = 1 if group.whole_rows else triton.cdiv(group.width, block)
    strides = [f"x{i}.stride({d})" for x, i in body.inputs.items() for d in body.row_dims[x]]
    sizes = ["rows"] + ([f"lead[{d}]" for d in range(1, len(group.lead))] if any(body.row_dims.values()) else [])
    lines += [
        "    if rows:",
        f"        rows_per_program, warps = launch_config(rows, {block})",
        f"        grid = (triton.cdiv(rows, rows_per_program), {columns})",
        f"        {kernel_name}[grid](",
        f"            {', '.join(args)},",
        f"            {', '.join(outs)},",
        f"            {', '.join(sizes + strides)},",
        f"            ROWS=rows_per_program, BLOCK={block}, num_warps=warps, **launch_options(x0.device),",
        "        )",
        f"    return {outs[0] if len(outs) == 1 else '(' + ', '.join(outs) + ')'}",
    ]
    return "\n".join(lines) + "\n"


def _docstring(group: FusionGroup, body: KernelBody) -> str:
    lines = [
        f'"""Generated by llmopt.codegen.fusion: {group.kind} group `{group.name}`, {len(group.nodes)} fx nodes, one kernel.',
        "",
        f"Iteration space: {_dims(group.lead + (group.width,))}, one row a leading index; BLOCK = {block_size(group)}.",
        "Inputs:",
        *(f"  x{i} = {x.name}: {_dims(shape(x))} {_dtype_name(x)}" for i, x in enumerate(group.inputs)),
        "Outputs:",
        *(f"  out{j} = {o.name}: {_dims(shape(o))} {_dtype_name(o)}" for j, o in enumerate(group.outputs)),
        "Nodes (fx node: ATen op -> kernel values):",
        *(f"  {n.name}: {n.target} -> {', '.join(body.values.get(n, ['(unused)']))}" for n in group.nodes),
        '"""',
    ]
    return "\n".join(lines)


def _generic_shape(node, group: FusionGroup) -> str:
    """A value's shape in the kernel's terms: L<d> for a leading dim it varies along, 1 where it broadcasts."""
    rank = len(group.lead) + 1
    dims = ["1" if isinstance(d, int) and d == 1 else f"L{k}" for k, d in enumerate(padded_lead(node, rank))]
    return "[" + ", ".join(dims + [str(width(node))]) + "]"


def _dims(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _dtype_name(node) -> str:
    return str(node.meta["val"].dtype).removeprefix("torch.")
