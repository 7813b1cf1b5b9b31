"""Save a compiled model to a directory and load it back, without pickle and without calibration.

Entry points: `save(compiled_model_or_program, directory)` and `load(directory, device=None,
backend="auto") -> CompiledModel` (also `CompiledModel.save`, `llmopt.save`, `llmopt.load`).

A saved model is two files (other files in the directory, a tokenizer say, are left alone):
- `weights.safetensors`: every weight the graph reads, by its attribute name; a weight that is the
  same tensor as another (tied embeddings) is stored once and listed in the manifest's `aliases`;
- `llmopt.json`: the manifest: format name and version, the recipe, the model config,
  `max_seq_len`, the sha256 of the weights file, the pass report, and the graph as JSON.

The graph is a list of nodes in order, each `{"op", "name", "target", "args": [...], "kwargs": {...}}`
and `"meta"` with llmopt's annotations (`weight_name`, `sparsity`). Targets are
qualified names resolved without importing anything: ops as `aten.linear.default` /
`llmopt.linear_wq.default` (through `torch.ops`), Python functions as `_operator.getitem`,
`math.ceil` or `torch.sym_max`. Argument values are JSON scalars or one-key objects: `{"node":
name}`, `{"tuple": [...]}`, `{"dict": {...}}`, `{"dtype": "float32"}`, `{"device": "cuda:0"}`,
`{"layout": "strided"}`, `{"memory_format": "contiguous_format"}`, `{"float": "inf"}`; lists are
JSON arrays. Placeholders keep their dtype and shape, symbolic dims by name with the hint they were
traced with, so `load` rebuilds the symbolic fake inputs (`input_ids`, `position_ids`: [batch,
tokens], dynamic) and re-derives every node's shape with `Program.recompile()`.

The manifest is written last, so a directory with a manifest holds a complete save.
"""
import hashlib
import json
import math
import operator
import os
from pathlib import Path

import torch
from torch.fx import Graph, GraphModule, Node

from llmopt.devices import checked_device
from llmopt.errors import LlmoptError

FORMAT = "llmopt-compiled-model"
FORMAT_VERSION = 1
MANIFEST = "llmopt.json"
WEIGHTS = "weights.safetensors"

_FUNCTION_MODULES = {"_operator": operator, "math": math, "torch": torch}
SAVED_META = ("weight_name", "sparsity")  # llmopt's own node annotations (passes and lowerings read them)


# ---- save ------------------------------------------------------------------------------------------
def save(model, directory) -> Path:
    """Write a CompiledModel or Program to `directory` (created if missing); returns its path."""
    from llmopt.compiled import CompiledModel
    from llmopt.program import Program

    if isinstance(model, CompiledModel):
        program, records, bytes_before = model.program, model.pass_records, model.bytes_before
    elif isinstance(model, Program):
        program, records, bytes_before = model, [], model.parameter_bytes()
    else:
        raise LlmoptError(f"llmopt.save expects a CompiledModel or a Program, got {type(model).__name__}")
    unique, aliases = _dedupe(program.weights())
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "weights": {"file": WEIGHTS, "sha256": None, "aliases": aliases},  # sha256 once the file is written
        "recipe": program.recipe,
        "config": program.config,
        "max_seq_len": program.max_seq_len,
        "bytes_before": bytes_before,
        "report": [{"name": r.name, "seconds": r.seconds, "changed": r.changed, "stats": _jsonable(r.stats)} for r in records],
        "graph": _encode_graph(program),
    }
    _to_json(manifest)  # before writing anything: unknown ops and values JSON cannot hold fail here
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LlmoptError(f"llmopt.save: {directory} is a file; give a directory (it is created if missing)")
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS, lambda tmp: _save_safetensors(unique, tmp))
    manifest["weights"]["sha256"] = _sha256(directory / WEIGHTS)
    text = _to_json(manifest)
    _atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory


def _to_json(manifest: dict) -> str:
    try:
        return json.dumps(manifest, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise LlmoptError(f"llmopt.save: the recipe, config or a node annotation holds a value JSON cannot store ({err}); "
                          "pass options and config entries must be numbers, strings, lists or dicts") from err


def _dedupe(weights: dict):
    """{name: tensor} -> ({name: contiguous tensor} stored once each, {alias: stored name})."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in weights.items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor.detach().contiguous()
    return unique, aliases


def _save_safetensors(tensors: dict, path: Path):
    from safetensors.torch import save_file

    # views of one storage that are not the same tensor (overlapping slices) are stored as copies
    by_storage = {}
    for name, t in tensors.items():
        if t.numel():
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
    shared = {name for names in by_storage.values() if len(names) > 1 for name in names}
    save_file({name: (t.clone() if name in shared else t).cpu() for name, t in tensors.items()}, str(path))


def _atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(stats: dict) -> dict:
    """Pass stats as JSON: numbers, strings and lists stay; anything else (a tensor, say) becomes its str."""
    return json.loads(json.dumps(stats, default=str))


def _encode_graph(program) -> list:
    nodes = []
    for node in program.graph.nodes:
        entry = {"op": node.op, "name": node.name, "target": _target_name(node)}
        meta = {k: node.meta[k] for k in SAVED_META if k in node.meta}
        if meta:
            entry["meta"] = meta
        if node.op == "placeholder":
            entry["value"] = _placeholder_spec(node)
        entry["args"] = [_encode(a, node) for a in node.args]
        entry["kwargs"] = {k: _encode(v, node) for k, v in node.kwargs.items()}
        nodes.append(entry)
    return nodes


def _target_name(node: Node) -> str:
    if node.op != "call_function":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)  # "aten.linear.default"
    elif getattr(target, "__module__", None) in _FUNCTION_MODULES:
        name = f"{target.__module__}.{target.__qualname__}"
    else:
        raise LlmoptError(f"llmopt.save: node {node.name} calls {target!r}, which a saved graph cannot name; "
                          "only torch.ops operators and functions of operator, math and torch can be saved")
    if _resolve_target(name, node.name) is not target:
        raise LlmoptError(f"llmopt.save: node {node.name} calls {target!r}, but {name!r} names something else")
    return name


def _placeholder_spec(node: Node) -> dict:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise LlmoptError(f"llmopt.save: input {node.name} has no traced value; recompile the Program first")
    dims = [{"sym": str(d.node.expr), "hint": int(d.node.hint)} if isinstance(d, torch.SymInt) else int(d) for d in val.shape]
    return {"dtype": str(val.dtype).removeprefix("torch."), "shape": dims}


def _encode(value, node: Node):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, node) for v in value]}
    if isinstance(value, list):
        return [_encode(v, node) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v, node) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise LlmoptError(f"llmopt.save: node {node.name} has an argument of type {type(value).__name__} ({value!r}) that cannot be saved")


# ---- load ------------------------------------------------------------------------------------------
def load(directory, device=None, backend: str = "auto"):
    """Rebuild the CompiledModel saved in `directory`, with its weights on `device` (CPU by default)."""
    from llmopt.compile import compile
    from llmopt.program import Program

    directory = Path(directory)
    manifest = _read_manifest(directory)
    device = checked_device(device or "cpu", "llmopt.load")
    try:
        weights = _read_weights(directory, manifest["weights"], device)
        gm = _decode_graph(manifest["graph"], weights, directory)
        program = Program(gm, config=manifest["config"], max_seq_len=int(manifest["max_seq_len"]), recipe=manifest["recipe"])
        _set_inputs(program, manifest["graph"], device)
        program.to(device)  # device literals in the graph follow the weights; recompiles (shapes re-derived)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LlmoptError(f"{directory / MANIFEST} is malformed ({type(err).__name__}: {err}); save the model again with llmopt.save") from err
    cm = compile(program, backend=backend)  # no passes: verifies the Program and picks the backend
    cm.bytes_before = int(manifest["bytes_before"])
    cm.pass_records = [_record(r) for r in manifest["report"]]
    return cm


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        what = "does not exist" if not directory.exists() else f"has no {MANIFEST}, so llmopt.save did not write it"
        raise LlmoptError(f"{directory} {what}: give a directory written by llmopt.save (or `llmopt compile ... --out DIR`); "
                          "a transformers model directory is compiled with llmopt.compile(AutoModelForCausalLM.from_pretrained(...))")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LlmoptError(f"{path} is not valid JSON ({err}): the file is damaged; save the model again with llmopt.save") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LlmoptError(f"{path} is not an llmopt manifest (no \"format\": \"{FORMAT}\"); save the model again with llmopt.save")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise LlmoptError(f"{path} has an unknown format version {version!r}; save the model again with llmopt.save")
    if version > FORMAT_VERSION:
        raise LlmoptError(f"{path} has format version {version}, newer than this llmopt reads (up to {FORMAT_VERSION}): upgrade llmopt")
    return manifest


def _read_weights(directory: Path, spec: dict, device: torch.device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / spec["file"]
    if path.name != spec["file"] or not path.is_file():
        raise LlmoptError(f"{path} is missing: the save in {directory} is incomplete; save the model again with llmopt.save")
    if _sha256(path) != spec["sha256"]:
        raise LlmoptError(f"{path} is corrupt or truncated (its sha256 differs from the one in {MANIFEST}); "
                          "copy the directory again or save the model again with llmopt.save")
    try:
        tensors = load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise LlmoptError(f"{path} is not a readable safetensors file ({err}); save the model again with llmopt.save") from err
    if device.type == "cpu":
        # safetensors maps the file, so a CPU tensor starts wherever its bytes lie in it (0.8 packs them unaligned),
        # and torch's CPU kernels choose their path, and so their rounding, by alignment: copied into memory torch
        # allocates, a loaded model computes bit for bit what the saved one did
        tensors = {name: tensor.clone() for name, tensor in tensors.items()}
    for alias, name in spec["aliases"].items():
        tensors[alias] = tensors[name]
    return tensors


def _decode_graph(entries: list, weights: dict, directory: Path) -> GraphModule:
    root = torch.nn.Module()
    graph = Graph()
    env = {}
    for e in entries:
        name = e["name"]
        args = tuple(_decode(a, env, name) for a in e["args"])
        kwargs = {k: _decode(v, env, name) for k, v in e["kwargs"].items()}
        target = _resolve_target(e["target"], name) if e["op"] == "call_function" else e["target"]
        if e["op"] == "get_attr":
            if target not in weights:
                raise LlmoptError(f"node {name} reads weight {target!r}, which {directory / WEIGHTS} lacks; save the model again")
            root.register_buffer(target, weights[target])
        if e["op"] == "output":
            graph.output(args[0])
            continue
        node = graph.create_node(e["op"], target, args, kwargs, name=name)
        node.meta.update(e.get("meta", {}))
        env[name] = node
    return GraphModule(root, graph)


def _resolve_target(name: str, node_name: str):
    """'aten.linear.default' -> torch.ops.aten.linear.default; '_operator.getitem' -> operator.getitem."""
    import llmopt.ops  # noqa: F401  (registers torch.ops.llmopt.*)

    module, _, rest = name.partition(".")
    try:
        if module in _FUNCTION_MODULES and "." not in rest:
            return getattr(_FUNCTION_MODULES[module], rest)
        namespace, op, overload = name.split(".")
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, ValueError, RuntimeError) as err:
        raise LlmoptError(f"node {node_name} calls {name!r}, an op this llmopt does not know (a newer llmopt, or a "
                          "library of custom ops not imported?); import the library that defines it, or upgrade llmopt") from err


def _decode(value, env: dict, node_name: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, env, node_name) for v in value]
    (tag, body), = value.items()  # every tagged value is a one-key object
    if tag == "node":
        if body not in env:
            raise LlmoptError(f"node {node_name} reads node {body!r}, which is not defined before it: the saved graph is malformed")
        return env[body]
    if tag == "tuple":
        return tuple(_decode(v, env, node_name) for v in body)
    if tag == "dict":
        return {k: _decode(v, env, node_name) for k, v in body.items()}
    if tag == "float":
        return float(body)
    if tag == "device":
        return torch.device(body)
    kinds = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
    if tag in kinds and isinstance(getattr(torch, body, None), kinds[tag]):
        return getattr(torch, body)
    raise LlmoptError(f"node {node_name} has an argument {value!r} this llmopt cannot read: the saved graph is malformed")


def _set_inputs(program, entries: list, device: torch.device):
    """Fake values for the placeholders, symbolic dims shared by name (input_ids and position_ids: [batch, tokens])."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    specs = {e["name"]: e["value"] for e in entries if e["op"] == "placeholder"}
    hints = {}
    for spec in specs.values():
        for d in spec["shape"]:
            if isinstance(d, dict):
                hints.setdefault(d["sym"], int(d["hint"]))
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False))  # duck_shape off: equal hints stay distinct symbols
    carrier = mode.from_tensor(torch.empty(*hints.values()), symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * len(hints)))
    symbols = dict(zip(hints, carrier.shape))
    for node in program.nodes("placeholder"):
        spec = specs[node.name]
        shape = [symbols[d["sym"]] if isinstance(d, dict) else d for d in spec["shape"]]
        with mode:
            node.meta["val"] = torch.empty(shape, dtype=getattr(torch, spec["dtype"]), device=device)


def _record(entry: dict):
    from llmopt.pass_manager import PassRecord

    return PassRecord(entry["name"], float(entry["seconds"]), bool(entry["changed"]), dict(entry["stats"]))
