"""The Program: llmopt's IR, an ATen-level torch.fx graph plus its weights. Passes see nothing else.

Entry point: `Program` (made by `llmopt.capture`). It gives
- the graph (`program.graph`, `program.gm`) with weights as `get_attr` nodes,
- nodes by role (`linears()`, `norms()`, `attentions()`, `embeddings()`, `lm_head()`; `llmopt.roles`),
- weight get/set/add by node or name,
- shape and dtype of every value (`shape(node)`: ints and sympy expressions for symbolic dims),
- `verify()`, `dump()`, `run(input_ids, position_ids=None) -> logits`, `.to(device, dtype)`, `copy()`.
"""
import operator

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node

from llmopt.errors import VerifyError

_SYMBOLIC_TARGETS = (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg)


class Program:
    """An executable ATen graph with its weights; see the module docstring."""

    def __init__(self, gm: GraphModule, config: dict = None, max_seq_len: int = 2048, recipe: list = None):
        self.gm = gm
        self.config = dict(config or {})
        self.max_seq_len = max_seq_len
        self.recipe = list(recipe or [])  # [{"pass": name, "options": {...}}], what was applied, in order
        self._derived_for = None  # what the shapes in meta["val"] were last derived for (`refresh_meta`)

    # ---- graph -------------------------------------------------------------------------------------
    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def nodes(self, op: str = None, target=None) -> list:
        return [n for n in self.graph.nodes if (op is None or n.op == op) and (target is None or n.target == target)]

    def recompile(self):
        """Regenerate code and shape metadata after graph edits."""
        self.graph.lint()
        self.gm.recompile()
        self.refresh_meta()

    def applied(self, pass_name: str) -> bool:
        return any(step["pass"] == pass_name for step in self.recipe)

    # ---- roles -------------------------------------------------------------------------------------
    def linears(self):
        from llmopt.roles import find_linears

        return find_linears(self)

    def norms(self):
        from llmopt.roles import find_norms

        return find_norms(self)

    def attentions(self):
        from llmopt.roles import find_attentions

        return find_attentions(self)

    def embeddings(self):
        from llmopt.roles import find_embeddings

        return find_embeddings(self)

    def lm_head(self):
        from llmopt.roles import find_lm_head

        return find_lm_head(self)

    def vocab_size(self) -> int:
        """Rows of the token embedding (the graph's first embedding, which reads input_ids): ids must lie below."""
        return self.get_weight(self.embeddings()[0].weight).shape[0]

    # ---- weights -----------------------------------------------------------------------------------
    def get_weight(self, node_or_name) -> torch.Tensor:
        name = node_or_name.target if isinstance(node_or_name, Node) else node_or_name
        return getattr(self.gm, name)

    def set_weight(self, node_or_name, tensor: torch.Tensor):
        """Replace a weight's tensor (shape may change; call `recompile()` after structural edits)."""
        name = node_or_name.target if isinstance(node_or_name, Node) else node_or_name
        if not hasattr(self.gm, name):
            raise KeyError(f"the Program has no weight named {name!r}")
        self.gm.register_buffer(name, tensor.detach())

    def add_weight(self, name_hint: str, tensor: torch.Tensor, like: Node = None, weight_name: str = None) -> Node:
        """Register a new weight and return its get_attr node (after `like`, else at the graph's top).

        `weight_name` is the user-facing name (the model's parameter name) recorded in the node's meta.
        """
        name, i = name_hint, 1
        while hasattr(self.gm, name):
            name, i = f"{name_hint}_{i}", i + 1
        self.gm.register_buffer(name, tensor.detach())
        anchor = like if like is not None else next(iter(self.graph.nodes))
        with self.graph.inserting_after(anchor) if like is not None else self.graph.inserting_before(anchor):
            node = self.graph.get_attr(name)
        node.meta["weight_name"] = weight_name or name
        return node

    def weights(self) -> dict:
        """{attr name: tensor} of every weight the graph reads."""
        return {n.target: self.get_weight(n) for n in self.nodes("get_attr")}

    def remove_unused_weights(self):
        for node in self.nodes("get_attr"):
            if not node.users:
                self.graph.erase_node(node)
        used = {n.target for n in self.nodes("get_attr")}
        for name in [name for name, _ in self.gm.named_buffers() if name not in used]:
            delattr(self.gm, name)

    def parameter_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights().values())

    # ---- values ------------------------------------------------------------------------------------
    def shape(self, node: Node) -> tuple:
        """Shape of a node's value: ints, and sympy expressions for symbolic (dynamic) dims."""
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise VerifyError(f"node {node.name} has no tensor value (op {node.op} {node.target})")
        return tuple(d.node.expr if isinstance(d, torch.SymInt) else int(d) for d in val.shape)

    def dtype(self, node: Node) -> torch.dtype:
        return node.meta["val"].dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.weights().values())).device

    @property
    def dtype_(self) -> torch.dtype:
        """The model's compute dtype: that of the token embedding table."""
        embeddings = self.embeddings()
        return self.get_weight(embeddings[0].weight).dtype if embeddings else torch.float32

    def refresh_meta(self):
        """Re-derive `meta["val"]` (fake tensors with symbolic dims) for every node, in order. Nothing to do when
        neither the graph nor any weight's shape, dtype or device changed since the last derivation: a pass's
        `recompile()` and the pass manager's `verify()` right after it derive them once. Otherwise only the nodes
        a change reaches run again (`_FakePropagation`): after a pass that swaps the linears, the new nodes."""
        key = self._derivation_key()
        if key == self._derived_for:
            return
        placeholders = self.nodes("placeholder")
        mode = placeholders[0].meta["val"].fake_mode
        _FakePropagation(self.gm, mode).run(*[p.meta["val"] for p in placeholders])
        self._derived_for = key

    def adopt_meta(self):
        """Take every node's present `meta["val"]` as derived (right after a capture: torch.export's own values), so
        the next `refresh_meta` runs only the nodes edited since."""
        for n in self.graph.nodes:
            if n.op not in ("placeholder", "output") and "val" in n.meta:
                n.meta[_DERIVED_FROM] = _source(self.gm, n)

    def _derivation_key(self) -> tuple:
        """What the derived shapes depend on: the graph's text, each weight's kind, the input placeholders' values."""
        weights = tuple((n.target, *_tensor_kind(getattr(self.gm, n.target, None))) for n in self.nodes("get_attr"))
        inputs = tuple(id(p.meta.get("val")) for p in self.nodes("placeholder"))
        return str(self.graph), weights, inputs

    def verify(self):
        """Check the graph: well-formed, every op known, every weight present, shapes consistent."""
        try:
            self.graph.lint()
        except Exception as err:  # fx raises RuntimeError/AssertionError with the node in the message
            raise VerifyError(f"malformed graph: {err}") from err
        for node in self.graph.nodes:
            if node.op == "get_attr" and not hasattr(self.gm, node.target):
                raise VerifyError(f"node {node.name} reads weight {node.target!r}, which the Program lacks")
            if node.op == "call_function" and not known_op(node.target):
                raise VerifyError(f"node {node.name} calls {node.target}, which is neither an ATen nor an llmopt op")
            if node.op in ("call_module", "call_method"):
                raise VerifyError(f"node {node.name} is a {node.op}; Programs hold ATen/llmopt ops only")
        try:
            self.refresh_meta()
        except Exception as err:  # shape propagation failure: report the node it stopped at
            raise VerifyError(f"shapes are inconsistent: {err}") from err

    # ---- execution ---------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor = None) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V]."""
        return run_logits(self.gm, input_ids, position_ids)

    __call__ = run

    def to(self, device=None, dtype: torch.dtype = None) -> "Program":
        """Move weights (and device/dtype literals in the graph) in place; returns self."""
        if device is not None:
            from llmopt.devices import checked_device

            device = checked_device(device, "Program.to")
        old_dtype = self.dtype_
        retyping_fp32 = dtype is not None and dtype != old_dtype and old_dtype == torch.float32
        if retyping_fp32:
            from llmopt.retype import retype_casts

            retype_casts(self, dtype)
        cast_only = _read_only_through_casts(self.graph)  # fp32 buffers transformers upcasts anyway (inv_freq)
        for name, tensor in list(self.weights().items()):
            moved = tensor.to(device) if device is not None else tensor
            if dtype is not None and tensor.dtype == old_dtype and name not in cast_only:
                moved = moved.to(dtype)
            self.gm.register_buffer(name, moved)
        if device is not None:
            _rewrite_literals(self.graph, torch.device, lambda d: torch.device(device))
            for p in self.nodes("placeholder"):
                with p.meta["val"].fake_mode:
                    p.meta["val"] = p.meta["val"].to(torch.device(device))
        if dtype is not None and dtype != old_dtype and not retyping_fp32:
            # a 16-bit capture says which casts are fp32 islands: only the model dtype changes
            _rewrite_literals(self.graph, torch.dtype, lambda d: dtype if d == old_dtype else d)
        self.recompile()
        if retyping_fp32:
            from llmopt.retype import cast_matmul_inputs

            if cast_matmul_inputs(self, dtype):
                self.recompile()
        return self

    def copy(self) -> "Program":
        """An independent copy: same graph structure, cloned weights."""
        root = torch.nn.Module()
        for name, tensor in self.weights().items():
            root.register_buffer(name, tensor.clone())
        graph = torch.fx.Graph()
        out = graph.graph_copy(self.graph, {})
        graph.output(out)
        return Program(GraphModule(root, graph), config=self.config, max_seq_len=self.max_seq_len, recipe=self.recipe)

    def dump(self) -> str:
        """Readable listing: one line a node with its role, shape and dtype."""
        from llmopt.roles import role_of

        lines = []
        for node in self.graph.nodes:
            val = node.meta.get("val")
            typ = ""
            if isinstance(val, torch.Tensor):
                typ = f"{str(val.dtype).removeprefix('torch.')}{list(self.shape(node))}"
            role = role_of(self, node)
            args = ", ".join(_short(a) for a in node.args)
            what = node.target if node.op == "get_attr" else (_op_name(node.target) if node.op == "call_function" else node.op)
            lines.append(f"{node.name:<28} {typ:<32} {('[' + role + ']') if role else '':<12} {what}({args})")
        return "\n".join(lines)

    def __repr__(self):
        return f"Program({len(self.graph.nodes)} nodes, {len(self.linears())} linears, {self.parameter_bytes() / 1e6:.1f} MB of weights)"


def run_logits(gm: GraphModule, input_ids: torch.Tensor, position_ids: torch.Tensor = None) -> torch.Tensor:
    """Run a captured graph: input_ids [B, T] (positions 0..T-1 unless given) -> logits [B, T, V]."""
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    with torch.no_grad():
        out = gm(input_ids, position_ids.contiguous())
    return out[0] if isinstance(out, (tuple, list)) else out


class _FakePropagation(torch.fx.Interpreter):
    """Runs the graph on fake tensors (symbolic shapes kept) and stores each result in meta['val'].

    Incremental: a node whose target, arguments and input values (the same objects) are those it was last derived
    from keeps its value without running; a node that runs and gives a value of the same kind (shape, strides,
    dtype, device) as before keeps the old object, so the nodes after it need not run either. A get_attr node is
    derived from its weight's kind. What each node was derived from sits in meta[_DERIVED_FROM]."""

    def __init__(self, gm, mode):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n):
        if n.op in ("placeholder", "output"):
            return super().run_node(n)
        source = _source(self.module, n)
        if n.meta.get(_DERIVED_FROM) == source and "val" in n.meta:
            return n.meta["val"]
        if n.op == "get_attr":
            result = self.mode.from_tensor(getattr(self.module, n.target), static_shapes=True)
        else:
            try:
                with self.mode, enable_python_dispatcher():  # symbolic sizes reach C++ kernels' size checks
                    result = super().run_node(n)
            except Exception as err:  # re-raised with the node named
                raise VerifyError(f"node {n.name} ({_op_name(n.target)}) fails on its input shapes: {err}") from err
        if not _same_kind(n.meta.get("val"), result):
            n.meta["val"] = result
        n.meta[_DERIVED_FROM] = source
        return n.meta["val"]


_DERIVED_FROM = "llmopt_derived_from"


def _source(gm: GraphModule, n: Node) -> "_Source":
    """What node `n` of `gm` is derived from: its weight's kind (get_attr), else its target, arguments and inputs."""
    if n.op == "get_attr":
        return _Source((n.target, *_tensor_kind(getattr(gm, n.target, None))), ())
    inputs = tuple(a.meta.get("val") for a in n.all_input_nodes)
    return _Source((n.target, repr(n.args), repr(n.kwargs)), inputs)


class _Source:
    """What a node's value was derived from: a description (compared with ==) and its input values, compared by
    identity (fake tensors' `==` would compute; holding them also keeps their ids from being reused)."""

    def __init__(self, description: tuple, inputs: tuple):
        self.description, self.inputs = description, inputs

    def __eq__(self, other):
        return (isinstance(other, _Source) and self.description == other.description
                and len(self.inputs) == len(other.inputs) and all(a is b for a, b in zip(self.inputs, other.inputs)))


def _same_kind(old, new) -> bool:
    """Whether two derived values are interchangeable for shape derivation: tensors of one shape, strides, dtype and
    device (symbolic dims compared as expressions), equal symbolic or plain scalars, or sequences of such."""
    if type(old) is not type(new):
        return False
    if isinstance(new, torch.Tensor):  # plain fake tensors only: a subclass (a sparse weight) is always taken anew
        return (type(new) is FakeTensor and new.layout == old.layout == torch.strided and new.dtype == old.dtype
                and new.device == old.device and _same_kind((*old.shape, *old.stride()), (*new.shape, *new.stride())))
    if isinstance(new, (tuple, list)):
        return len(new) == len(old) and all(_same_kind(a, b) for a, b in zip(old, new))
    if isinstance(new, torch.SymInt):
        return new.node.expr == old.node.expr
    return new is None or isinstance(new, (int, float, bool)) and new == old


def _tensor_kind(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return type(value), tuple(value.shape), value.dtype, value.device
    return (type(value), )


def known_op(target) -> bool:
    """Whether a call_function target may stand in a Program: ATen, prims, llmopt and symbolic-shape ops."""
    if target in _SYMBOLIC_TARGETS:
        return True
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target.namespace in ("aten", "llmopt", "prims")
    return getattr(target, "__module__", "").startswith(("torch.", "_operator", "math")) or target in (torch.sym_max, torch.sym_min)


def _read_only_through_casts(graph) -> set:
    from llmopt.roles import CAST_OPS

    return {
        n.target for n in graph.nodes
        if n.op == "get_attr" and n.users and all(u.op == "call_function" and u.target in CAST_OPS for u in n.users)
    }


def _rewrite_literals(graph, kind, fn):
    def rewrite(a):
        return fn(a) if isinstance(a, kind) else a

    for node in graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, rewrite)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, rewrite)


def _op_name(target) -> str:
    return str(target).removeprefix("aten.") if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _short(a) -> str:
    if isinstance(a, Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in a) + "]"
    return str(a)


