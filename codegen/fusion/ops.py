"""The ATen ops a fusion group may hold, and the Triton expression of each.

Entry points: `fusible(node) -> bool` (may the node join a group?), `kind(node) -> str`,
`is_reduction(node)`, `operands(node) -> list` (the tensor values it reads) and
`expression(node, operands) -> str` for pointwise ops.

Kinds:
- "pointwise": elementwise math, written in fp32 (`_POINTWISE`: add, sub, mul, div, neg, rsqrt, exp,
  silu, gelu, tanh, sigmoid, relu, pow with a scalar exponent, round, clamp, where, ...);
- "cast": dtype casts and copies; the value is unchanged here, since the kernel writer rounds every
  value to its node's dtype (the way eager PyTorch rounds each op's result; a float to int8 cast
  truncates toward zero, as torch's does);
- "slice" / "cat": on the last dim, step 1; the writer turns them into column-index remaps, so
  RoPE's rotate_half (`cat([-x[..., h:], x[..., :h]], -1)`) and partial-rotary concatenations fuse
  with no dedicated pattern;
- "reduce": `mean` / `sum` / `amax` over the last dim with keepdim; "layer_norm" over the last dim.

A fusible node computes a fp16/bf16/fp32 value with a static last dim, or an int8 value by a cast of a
float one (activation quantization: `round(x / s).clamp(-127, 127).to(int8)`); its tensor operands are
float or integer values (bool only as `where`'s condition), its scalar operands Python numbers.
"""
import math
import numbers

import torch
from torch.fx import Node

aten = torch.ops.aten

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ROW = 16384  # widest row a reduction keeps in registers (one program holds the whole row)

_CASTS = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
    aten.clone.default, aten.alias.default, aten.contiguous.default,
}
_REDUCTIONS = {aten.mean.dim: "mean", aten.sum.dim_IntList: "sum", aten.amax.default: "amax"}

_SQRT_HALF = 0.7071067811865476  # 1/sqrt(2), exact gelu
_SQRT_2_OVER_PI = 0.7978845608028654  # tanh-approximate gelu


def _tanh(a: str) -> str:
    """tanh from sigmoid (no tl.tanh, and libdevice has no interpreter version): absolute error ~1e-7."""
    return f"(2.0 * tl.sigmoid(2.0 * {a}) - 1.0)"


def _alpha(node: Node, b: str) -> str:
    alpha = node.kwargs.get("alpha", 1)
    return b if alpha == 1 else f"{b} * {literal(alpha)}"


def _pow(node: Node, ops) -> str:
    a, p = ops[0], float(node.args[1])
    if p == 0.5:
        return f"tl.sqrt_rn({a})"
    if p == -0.5:
        return f"tl.rsqrt({a})"
    if p.is_integer() and 1 <= abs(p) <= 4:
        product = " * ".join([a] * int(abs(p)))
        return f"({product})" if p > 0 else f"tl.div_rn(1.0, {product})"
    return f"tl.exp2({literal(p)} * tl.log2({a}))"  # x > 0 only, as eager's NaN for x < 0 and a fractional p


def _gelu(node: Node, ops) -> str:
    a = ops[0]
    if _approximate(node) == "tanh":
        return f"0.5 * {a} * (1.0 + {_tanh(f'{_SQRT_2_OVER_PI} * ({a} + 0.044715 * {a} * {a} * {a})')})"
    return f"0.5 * {a} * (1.0 + tl.erf({a} * {_SQRT_HALF}))"


def _round(node: Node, ops) -> str:
    """torch.round: the nearest integer, ties to even. Below 2**23, `|a| + 2**23` lands where fp32's
    spacing is 1, so the float unit's own round-to-nearest-even rounds |a| (two adds, no rint: the
    interpreter has none); from 2**23 on every fp32 value is an integer already."""
    a = ops[0]
    rounded = f"((tl.abs({a}) + 8388608.0) - 8388608.0)"
    return f"tl.where(tl.abs({a}) < 8388608.0, tl.where({a} < 0.0, -{rounded}, {rounded}), {a})"


def _clamp(node: Node, ops) -> str:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    out = ops[0]
    if lo is not None:
        out = f"tl.maximum({out}, {literal(lo)})"
    if hi is not None:
        out = f"tl.minimum({out}, {literal(hi)})"
    return out


# op -> (node, operand strings) -> Triton expression on fp32 tiles
_POINTWISE = {
    aten.add.Tensor: lambda n, o: f"{o[0]} + {_alpha(n, o[1])}",
    aten.add.Scalar: lambda n, o: f"{o[0]} + {_alpha(n, o[1])}",
    aten.sub.Tensor: lambda n, o: f"{o[0]} - {_alpha(n, o[1])}",
    aten.sub.Scalar: lambda n, o: f"{o[0]} - {_alpha(n, o[1])}",
    aten.rsub.Scalar: lambda n, o: f"{o[1]} - {_alpha(n, o[0])}",
    aten.rsub.Tensor: lambda n, o: f"{o[1]} - {_alpha(n, o[0])}",
    aten.mul.Tensor: lambda n, o: f"{o[0]} * {o[1]}",
    aten.mul.Scalar: lambda n, o: f"{o[0]} * {o[1]}",
    aten.div.Tensor: lambda n, o: f"tl.div_rn({o[0]}, {o[1]})",
    aten.div.Scalar: lambda n, o: f"tl.div_rn({o[0]}, {o[1]})",
    aten.neg.default: lambda n, o: f"-{o[0]}",
    aten.reciprocal.default: lambda n, o: f"tl.div_rn(1.0, {o[0]})",
    aten.rsqrt.default: lambda n, o: f"tl.rsqrt({o[0]})",
    aten.sqrt.default: lambda n, o: f"tl.sqrt_rn({o[0]})",
    aten.exp.default: lambda n, o: f"tl.exp({o[0]})",
    aten.log.default: lambda n, o: f"tl.log({o[0]})",
    aten.sin.default: lambda n, o: f"tl.sin({o[0]})",
    aten.cos.default: lambda n, o: f"tl.cos({o[0]})",
    aten.abs.default: lambda n, o: f"tl.abs({o[0]})",
    aten.erf.default: lambda n, o: f"tl.erf({o[0]})",
    aten.tanh.default: lambda n, o: _tanh(o[0]),
    aten.sigmoid.default: lambda n, o: f"tl.sigmoid({o[0]})",
    aten.silu.default: lambda n, o: f"{o[0]} * tl.sigmoid({o[0]})",
    aten.gelu.default: _gelu,
    aten.relu.default: lambda n, o: f"tl.maximum({o[0]}, 0.0)",
    aten.pow.Tensor_Scalar: _pow,
    aten.maximum.default: lambda n, o: f"tl.maximum({o[0]}, {o[1]})",
    aten.minimum.default: lambda n, o: f"tl.minimum({o[0]}, {o[1]})",
    aten.clamp.default: _clamp,
    aten.clamp_min.default: lambda n, o: f"tl.maximum({o[0]}, {o[1]})",
    aten.clamp_max.default: lambda n, o: f"tl.minimum({o[0]}, {o[1]})",
    aten.round.default: _round,
    aten.where.self: lambda n, o: f"tl.where({o[0]}, {o[1]}, {o[2]})",
}


def kind(node: Node) -> str:
    """'pointwise', 'cast', 'slice', 'cat', 'reduce' or 'layer_norm' (for a node `fusible` accepts)."""
    target = node.target
    if target in _POINTWISE:
        return "pointwise"
    if target in _CASTS:
        return "cast"
    if target in _REDUCTIONS:
        return "reduce"
    return {aten.slice.Tensor: "slice", aten.cat.default: "cat", aten.layer_norm.default: "layer_norm"}.get(target, "")


def operands(node: Node) -> list:
    """The tensor values `node` reads: a cast reads its input only (type_as's other gives a dtype)."""
    if kind(node) in ("cast", "slice", "reduce"):
        return [node.args[0]]
    if node.target == aten.layer_norm.default:
        return [a for a in node.args[:1] + node.args[2:4] if isinstance(a, Node)]
    return [a for a in _flat_args(node) if isinstance(a, Node)]


def is_reduction(node: Node) -> bool:
    return kind(node) in ("reduce", "layer_norm")


def reduction_name(node: Node) -> str:
    """'mean', 'sum', 'amax' or 'layer_norm'."""
    return _REDUCTIONS.get(node.target, "layer_norm")


def expression(node: Node, operands: list) -> str:
    """The Triton expression of a pointwise node over fp32 operand tiles (names or literals)."""
    return _POINTWISE[node.target](node, operands)


def literal(value) -> str:
    """A Python number as a float literal of the kernel source."""
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else '-float("inf")'
    return repr(value)


def fusible(node: Node) -> bool:
    """May `node` be computed inside a generated kernel? See the module docstring."""
    if node.op != "call_function" or not kind(node):
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not _value_dtype_ok(node, val) or not _static_last_dim(val):
        return False
    if any(isinstance(v, Node) for v in node.kwargs.values()):
        return False  # tensors are positional in captured graphs; keyword tensors are left to eager
    if not all(_operand_ok(node, i, a) for i, a in enumerate(_flat_args(node))):
        return False
    return _op_ok(node, val)


def _value_dtype_ok(node: Node, val: torch.Tensor) -> bool:
    """A float value, or int8 cast from a float value (a quantized activation)."""
    if val.dtype in FLOAT_DTYPES:
        return True
    source = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], Node) else None
    return val.dtype == torch.int8 and kind(node) == "cast" and isinstance(source, torch.Tensor) and source.dtype in FLOAT_DTYPES


def _flat_args(node: Node) -> list:
    """Positional operands, cat's tensor list flattened."""
    return list(node.args[0]) + list(node.args[1:]) if node.target == aten.cat.default else list(node.args)


def _operand_ok(node: Node, index: int, arg) -> bool:
    if not isinstance(arg, Node):
        return not isinstance(arg, (torch.SymInt, torch.SymFloat, torch.Tensor))
    val = arg.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() > node.meta["val"].dim() or not _static_last_dim(val):
        return False
    if val.dtype == torch.bool:
        return node.target == aten.where.self and index == 0
    return val.dtype in FLOAT_DTYPES or not (val.dtype.is_floating_point or val.dtype.is_complex)


def _op_ok(node: Node, val: torch.Tensor) -> bool:
    """Op-specific conditions: last dim only, keepdim, scalar exponents, known gelu forms."""
    rank = val.dim()
    last = (-1, rank - 1)
    target = node.target
    if target == aten.slice.Tensor:
        dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
        return dim in last and step == 1 and all(x is None or isinstance(x, int) for x in (start, end))
    if target == aten.cat.default:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return dim in last and all(isinstance(t, Node) and t.meta["val"].dim() == rank for t in node.args[0])
    if target in _REDUCTIONS:
        source = node.args[0].meta["val"]
        dims = list(node.args[1]) if len(node.args) > 1 else []
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return (source.dim() == rank and len(dims) == 1 and dims[0] in last and keepdim is True
                and node.kwargs.get("dtype") is None and 1 < source.shape[-1] <= MAX_ROW)
    if target == aten.layer_norm.default:
        return len(node.args[1]) == 1 and 1 < val.shape[-1] <= MAX_ROW
    if target == aten.pow.Tensor_Scalar:
        return isinstance(node.args[1], numbers.Real)
    if target == aten.gelu.default:
        return _approximate(node) in ("none", "tanh")
    if target in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor):
        return isinstance(node.kwargs.get("alpha", 1), numbers.Real)
    if target == aten.div.Tensor:
        return not node.kwargs.get("rounding_mode")
    return True


def _approximate(node: Node) -> str:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")


def _static_last_dim(val: torch.Tensor) -> bool:
    return val.dim() == 0 or isinstance(val.shape[-1], int)
