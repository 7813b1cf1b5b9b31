"""The body of a group's Triton kernel: every fx node of the group as fp32 tiles, loads and stores.

Entry point: `KernelBody(group)`; after construction, `.lines` holds the kernel's statements,
`.row_dims[x]` the leading dims input x varies along, `.values[node]` the tile names a node became.

- Each value is an fp32 tile `[ROWS or 1, BLOCK or 1]`, rounded to its node's dtype after the op that
  makes it (eager PyTorch's numbers: fp32 math, one rounding per op; an int8 cast truncates toward
  zero); a `where` condition is a bool tile.
- `value(node, col)` writes a node at a column position on demand, memoized: `Col(c, vec=True)` is
  `cols + c`, `Col(j, vec=False)` the single column j. Slices shift the position, cats pick a piece
  with `tl.where`, so rotate_half becomes two masked loads of q at `cols + h` and `cols - h`. A value
  of width 1 (a reduction, a `[..., 1]` row scalar) is always read at column 0: that is its broadcast.
- Inputs are loaded in place: row offset `sum(i_d * stride_d)` over the leading dims the input varies
  along (a dim it broadcasts over is skipped, so RoPE's `[B, 1, T, D]` cos is read once per (b, t)),
  plus the column; loads are masked by rows < M and 0 <= column < the input's width.
- Reductions read their operand over the whole row (`cols`; the launcher makes BLOCK cover it) and
  mask the columns past its width.
The text names ATen ops and value numbers only, never fx node names: identical groups of different
layers give identical kernels.
"""
from dataclasses import dataclass

import torch
from torch.fx import Node

from llmopt.codegen.fusion import ops
from llmopt.codegen.fusion.partition import FusionGroup, padded_lead, width

_TL_DTYPES = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32", torch.int8: "tl.int8"}


@dataclass(frozen=True)
class Col:
    """A position along the last dim: `cols + offset` (vec) or the single column `offset`."""

    offset: int
    vec: bool

    def shift(self, by: int) -> "Col":
        return Col(self.offset + by, self.vec)

    @property
    def expr(self) -> str:
        """Triton expression of the column index: a [BLOCK] vector, or an int."""
        if not self.vec:
            return str(self.offset)
        if self.offset == 0:
            return "cols"
        return f"(cols + {self.offset})" if self.offset > 0 else f"(cols - {-self.offset})"


@dataclass(frozen=True)
class Tile:
    name: str
    rows: bool  # varies along rows: shape [ROWS, ...], else [1, ...] or a scalar
    cols: bool  # varies along columns: shape [..., BLOCK]


class KernelBody:
    """Writes the statements of a group's kernel; see the module docstring."""

    def __init__(self, group: FusionGroup):
        self.group = group
        self.rank = len(group.lead) + 1
        self.members = set(group.nodes)
        self.inputs = {x: i for i, x in enumerate(group.inputs)}
        self.row_dims = {x: [d for d, size in enumerate(padded_lead(x, self.rank)) if not _is_one(size)] for x in group.inputs}
        self.lines = []
        self.values = {}  # node -> [tile names], for the module docstring
        self._memo = {}
        self._stats = {}  # layer_norm node -> (mean, 1/std) tiles
        self._row_offsets = set()
        self._count = 0
        for j, out in enumerate(group.outputs):
            self._store(j, out)

    # ---- values ------------------------------------------------------------------------------------
    def value(self, node: Node, col: Col) -> Tile:
        """The tile of `node` at column position `col`, written on first use."""
        if width(node) == 1:
            col = Col(0, vec=False)
        key = (node, col)
        if key not in self._memo:
            self._memo[key] = self._compute(node, col) if node in self.members else self._load(node, col)
            self.values.setdefault(node, []).append(self._memo[key].name)
        return self._memo[key]

    def _compute(self, node: Node, col: Col) -> Tile:
        kind = ops.kind(node)
        if kind == "cast":
            source = self.value(node.args[0], col)
            if _dtype(node) in (torch.float32, _dtype(node.args[0])):
                return source  # exact: no statement
            return self._emit(source.name, node, source.rows, source.cols)
        if kind == "slice":
            start, n = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0, width(node.args[0])
            return self.value(node.args[0], col.shift(min(max(start + n if start < 0 else start, 0), n)))
        if kind == "cat":
            return self._cat(node, col)
        if kind == "reduce":
            return self._reduce(node)
        if kind == "layer_norm":
            return self._layer_norm(node, col)
        tiles = [self.value(a, col) if isinstance(a, Node) else None for a in node.args]
        operands = [t.name if t else (ops.literal(a) if _is_number(a) else None) for t, a in zip(tiles, node.args)]
        present = [t for t in tiles if t]
        return self._emit(ops.expression(node, operands), node, any(t.rows for t in present), any(t.cols for t in present))

    def _cat(self, node: Node, col: Col) -> Tile:
        pieces, starts, start = node.args[0], [], 0
        for piece in pieces:
            starts.append(start)
            start += width(piece)
        if not col.vec:  # a single column: its piece is known here
            i = max(k for k, s in enumerate(starts) if s <= col.offset)
            return self.value(pieces[i], col.shift(-starts[i]))
        tiles = [self.value(p, col.shift(-s)) for p, s in zip(pieces, starts)]
        expr = tiles[-1].name
        for tile, end in zip(tiles[-2::-1], starts[:0:-1]):
            expr = f"tl.where(({col.expr} < {end})[None, :], {tile.name}, {expr})"
        # no rounding: every piece is exact in the cat's dtype (its pieces' promoted dtype)
        return self._emit(expr, None, any(t.rows for t in tiles), True, comment=str(node.target))

    def _reduce(self, node: Node) -> Tile:
        source, n = self.value(node.args[0], Col(0, vec=True)), width(node.args[0])
        name = ops.reduction_name(node)
        fill, fn = ('-float("inf")', "tl.max") if name == "amax" else ("0.0", "tl.sum")
        expr = f"{fn}(tl.where((cols < {n})[None, :], {source.name}, {fill}), axis=1, keep_dims=True)"
        if name == "mean":
            expr = f"tl.div_rn({expr}, {float(n)})"
        return self._emit(expr, node, source.rows, False)

    def _layer_norm(self, node: Node, col: Col) -> Tile:
        x = node.args[0]
        mean, rstd = self._stats.get(node) or self._row_stats(node)
        expr = f"({self.value(x, col).name} - {mean.name}) * {rstd.name}"
        for affine, op in zip(node.args[2:4], ("*", "+")):
            if isinstance(affine, Node):
                expr = f"{expr} {op} {self.value(affine, col).name}"
        return self._emit(expr, node, mean.rows, True)

    def _row_stats(self, node: Node) -> tuple:
        """layer_norm's row mean and 1/std (two passes over the row held in registers)."""
        x, n = node.args[0], width(node.args[0])
        whole = self.value(x, Col(0, vec=True))
        total = f"tl.sum(tl.where((cols < {n})[None, :], {whole.name}, 0.0), axis=1, keep_dims=True)"
        mean = self._emit(f"tl.div_rn({total}, {float(n)})", None, whole.rows, False, comment="layer_norm: row mean")
        centered = self._emit(f"tl.where((cols < {n})[None, :], {whole.name} - {mean.name}, 0.0)", None, whole.rows, True,
                              comment="layer_norm: centered row")
        eps = ops.literal(node.args[4] if len(node.args) > 4 else 1e-5)
        variance = f"tl.div_rn(tl.sum({centered.name} * {centered.name}, axis=1, keep_dims=True), {float(n)})"
        rstd = self._emit(f"tl.rsqrt({variance} + {eps})", None, whole.rows, False, comment="layer_norm: 1 / std")
        self._stats[node] = (mean, rstd)
        return mean, rstd

    def _emit(self, expr: str, node, rows: bool, cols: bool, comment: str = "") -> Tile:
        """A statement `vN = expr`, rounded to the node's dtype below fp32."""
        name = f"v{self._count}"
        self._count += 1
        if node is not None and _dtype(node) != torch.float32:
            expr = f"({expr}).to({_TL_DTYPES[_dtype(node)]}).to(tl.float32)"
        self.lines.append(f"{name} = {expr}  # {comment or node.target}")
        return Tile(name, rows, cols)

    # ---- memory ------------------------------------------------------------------------------------
    def _load(self, x: Node, col: Col) -> Tile:
        i, n, dims = self.inputs[x], width(x), self.row_dims[x]
        if dims and x not in self._row_offsets:
            offset = " + ".join(f"i{d} * x{i}_s{d}" for d in dims)
            self.lines.append(f"x{i}_row = {offset}  # [ROWS] offsets of x{i}'s rows")
            self._row_offsets.add(x)
        row = f" + x{i}_row[:, None]" if dims else ""
        if col.vec:
            inside = f"({col.expr} < {n})" if col.offset >= 0 else f"(({col.expr} >= 0) & ({col.expr} < {n}))"
            ptr, mask = f"x{i}_ptr{row} + {col.expr}[None, :]", f"{inside}[None, :]"
            mask = f"rmask[:, None] & {mask}" if dims else mask
        else:
            ptr = f"x{i}_ptr{row}" + (f" + {col.offset}" if col.offset else "")
            mask = "rmask[:, None]" if dims else ""
        load = f"tl.load({ptr}, mask={mask}, other=0)" if mask else f"tl.load({ptr})"
        convert = " != 0" if x.meta["val"].dtype == torch.bool else ".to(tl.float32)"
        where = f"columns {col.expr}" if col.vec else f"column {col.offset}"
        return self._emit(f"{load}{convert}", None, bool(dims), col.vec, comment=f"x{i} at {where}")

    def _store(self, j: int, out: Node):
        k = self.group.width
        if width(out) == 1:
            tile, shape = self.value(out, Col(0, vec=False)), "(ROWS, 1)"
            ptr, mask = f"out{j}_ptr + rows[:, None]", "rmask[:, None]"
            full = tile.rows
        else:
            tile, shape = self.value(out, Col(0, vec=True)), "(ROWS, BLOCK)"
            ptr, mask = f"out{j}_ptr + rows[:, None] * {k} + cols[None, :]", f"rmask[:, None] & (cols < {k})[None, :]"
            full = tile.rows and tile.cols
        value = tile.name if full else f"tl.broadcast_to({tile.name}, {shape})"
        self.lines.append(f"tl.store({ptr}, {value}.to(out{j}_ptr.dtype.element_ty), mask={mask})")


def _dtype(node: Node) -> torch.dtype:
    return node.meta["val"].dtype


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _is_number(a) -> bool:
    return isinstance(a, (int, float, bool))
