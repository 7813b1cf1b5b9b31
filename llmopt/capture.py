"""Capture a transformers causal LM into a Program with torch.export.

Entry point: `capture(model, example_inputs=None) -> Program`.

The model is traced without KV cache (`use_cache=False`), with `position_ids` as an explicit input, and
with the batch and token dimensions dynamic: one captured graph serves every sequence length up to the
model's maximum. Parameters, buffers and constants become `get_attr` weights of the Program's graph
module; device-pinning assert nodes that torch.export leaves behind are dropped; GPT-2's Conv1D
(`addmm` with a `[in, out]` weight) is canonicalized to `aten.linear` so that passes see one linear form.
"""
import contextlib
import re
import traceback

import torch
from torch.export import Dim
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.fx import GraphModule

from llmopt.errors import CaptureError
from llmopt.program import Program

_DROPPED_TARGETS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
}


class CausalLMLogits(torch.nn.Module):
    """forward(input_ids [B, T], position_ids [B, T]) -> logits [B, T, V], no KV cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids):
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def max_positions(model) -> int:
    """The longest sequence the model's config allows (its position-embedding table or rope limit)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return 2048


def capture(model: torch.nn.Module, example_inputs=None) -> Program:
    """Trace `model` with torch.export into a Program whose batch and token dims are dynamic.

    example_inputs: optional `(input_ids [B, T],)` or `(input_ids, position_ids)`; by default a
    `[2, 8]` batch of token ids is used. Raises `CaptureError` (and builds nothing) when torch.export
    rejects the model.
    """
    _check_model(model)
    max_len = max_positions(model)
    input_ids, position_ids = _example_inputs(model, example_inputs, max_len)
    # AUTO hints (not named Dims): guards that hold for every length but that the solver cannot prove,
    # such as min(64·T, 128·T) == 64·T from CUDA's SDPA shape functions, are kept rather than fatal;
    # `_check_dynamic` then refuses a capture in which a dim was specialized to one value
    batch, tokens = Dim.AUTO(min=1, max=1024), Dim.AUTO(min=1, max=max_len)
    dynamic = {"input_ids": {0: batch, 1: tokens}, "position_ids": {0: batch, 1: tokens}}
    was_training = model.training
    model.eval()
    try:
        # the math SDPA backend while tracing: the graph keeps one scaled_dot_product_attention op
        # either way, but CUDA's fused backends add stride guards that torch.export cannot prove for
        # every length (seen on torch 2.11 with GQA shapes)
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), _kv_repeat_in_graph():
            exported = torch.export.export(
                CausalLMLogits(model), (input_ids, position_ids), dynamic_shapes=dynamic, strict=False
            )
    except Exception as err:  # torch.export raises many unrelated types; all become one clear error
        raise CaptureError(_explain_export_failure(model, err)) from err
    finally:
        model.train(was_training)
    _check_dynamic(exported, model)
    gm = _to_graph_module(exported)
    _unshare_weights(gm)
    config = model.config.to_dict() if hasattr(model, "config") else {}
    _check_ops(gm, model)
    program = Program(gm, config=config, max_seq_len=max_len)
    program.adopt_meta()  # torch.export derived every shape already; recompile() below derives those of the edits
    _canonicalize_conv1d(program)
    _remove_identities(program)
    program.recompile()
    program.verify()  # the shapes recompile() derived are not derived again (Program.refresh_meta)
    return program


@contextlib.contextmanager
def _kv_repeat_in_graph():
    """Trace GQA as transformers' explicit K/V repeat, not as SDPA's `enable_gqa`.

    On CUDA, transformers passes `enable_gqa=True` to SDPA when there is no mask; SDPA's CUDA shape
    function then adds stride guards (min(64·T, 128·T) == 64·T) that torch.export cannot prove for
    every length, and capture fails. The explicit repeat traces cleanly and FuseAttention removes it
    again, so the captured graph is the same on every device.
    """
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        yield
        return
    original = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if original is None:
        yield
        return
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original


def _check_dynamic(exported, model):
    for node in exported.graph.nodes:
        if node.op == "placeholder" and node.name in ("input_ids", "position_ids"):
            dims = node.meta["val"].shape
            if not all(isinstance(d, torch.SymInt) for d in dims):
                raise CaptureError(
                    f"torch.export specialized the batch or token dimension of {type(model).__name__} to a constant "
                    f"(shape {list(dims)}): the model branches on the sequence length; pass example_inputs of a typical "
                    "batch and length, or report the model"
                )


def _check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"capture expects a torch.nn.Module (a transformers causal LM), got {type(model).__name__}; "
            "load one with transformers.AutoModelForCausalLM.from_pretrained(...)"
        )
    if not hasattr(model, "config") or not hasattr(model.config, "vocab_size"):
        raise CaptureError(
            f"{type(model).__name__} has no transformers config with a vocab_size; llmopt captures "
            "decoder-only causal LMs (AutoModelForCausalLM); wrap other models so that "
            "model(input_ids=..., position_ids=..., use_cache=False).logits works"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise CaptureError(
            f"{type(model).__name__} is an encoder-decoder model ({model.config.model_type}); llmopt captures "
            "decoder-only causal LMs (AutoModelForCausalLM: Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2, OPT, "
            "GPT-NeoX...)"
        )
    if hasattr(model, "can_generate") and not model.can_generate():
        raise CaptureError(
            f"{type(model).__name__} cannot generate text (not a causal LM head); llmopt captures decoder-only causal "
            f"LMs: load the model with AutoModelForCausalLM rather than {type(model).__name__}"
        )
    on_meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if on_meta is not None:
        raise CaptureError(
            f"{type(model).__name__}'s weights are not loaded: {on_meta} is on the meta device (an empty init or "
            "device_map='meta'); load them first (AutoModelForCausalLM.from_pretrained(path), not an empty init)"
        )


def _example_inputs(model, example_inputs, max_len):
    device = next(model.parameters()).device
    if example_inputs is None:
        length = min(8, max_len)
        input_ids = torch.randint(0, model.config.vocab_size, (2, length), device=device)
        position_ids = None
    else:
        input_ids = example_inputs[0]
        position_ids = example_inputs[1] if len(example_inputs) > 1 else None
    if input_ids.shape[-1] < 2:
        raise CaptureError("example input_ids need at least 2 tokens so the token dimension can be traced as dynamic")
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if input_ids.shape[0] == 1:  # torch.export specializes a size-1 dim: trace the batch as 2 rows
        input_ids, position_ids = input_ids.repeat(2, 1), position_ids.repeat(2, 1)
    return input_ids, position_ids.contiguous()


def _check_ops(gm: GraphModule, model) -> None:
    """CaptureError naming the first op outside ATen in the traced graph (passes and codegen know ATen only) and the
    model module it comes from."""
    from llmopt.program import known_op

    for node in gm.graph.nodes:
        if node.op != "call_function" or known_op(node.target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        where = f" in {list(stack.values())[-1][0].removeprefix('model.')}" if stack else ""  # CausalLMLogits.model
        if "grouped_mm" in str(node.target):
            hint = ("transformers runs its mixture-of-experts layers through that op: load the model with "
                    "experts_implementation='batched_mm' (from_pretrained(path, experts_implementation='batched_mm')), "
                    "which traces to ATen")
        else:
            hint = ("llmopt's passes and kernels read ATen ops only; load the model with attn_implementation='sdpa' or "
                    "'eager', or report the model")
        raise CaptureError(f"{type(model).__name__} traces to {node.target}{where}, an op outside ATen: {hint}")


def _explain_export_failure(model, err) -> str:
    name = type(model).__name__
    frames = traceback.extract_tb(err.__traceback__)
    user_frames = [f for f in frames if "torch/" not in f.filename and "/llmopt/" not in f.filename]
    where = f" (last model frame: {user_frames[-1].filename}:{user_frames[-1].lineno} in {user_frames[-1].name})" if user_frames else ""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    op = re.search(r"(aten\.\w+|torch\.ops\.[\w.]+)", str(err))
    cause = f"op {op.group(1)}: " if op else ""
    return (
        f"torch.export could not capture {name}: {cause}{type(err).__name__}: {first_line}{where}. "
        "Try: load the model with attn_implementation='sdpa' or 'eager', remove data-dependent Python "
        "control flow on tensor values, or pass example_inputs of a typical length."
    )


def _to_graph_module(exported) -> GraphModule:
    """ExportedProgram -> GraphModule with weights as get_attr nodes and inputs (input_ids, position_ids)."""
    from torch.export.graph_signature import InputKind

    root = torch.nn.Module()
    gm_src = exported.graph_module
    graph = torch.fx.Graph()
    env = {}
    state = dict(exported.state_dict)
    state.update(exported.constants)
    for node in gm_src.graph.nodes:
        if node.op == "placeholder":
            spec = next(s for s in exported.graph_signature.input_specs if s.arg.name == node.name)
            if spec.kind == InputKind.USER_INPUT:
                new = graph.placeholder(node.name)
            else:
                attr = _attr_name(spec.target)
                tensor = state[spec.target]
                root.register_buffer(attr, tensor.detach() if isinstance(tensor, torch.Tensor) else tensor)
                new = graph.get_attr(attr)
                new.meta["weight_name"] = _weight_name(spec.target)
            new.meta.update({k: v for k, v in node.meta.items() if k == "val"})
            env[node] = new
        elif node.op == "call_function" and node.target in _DROPPED_TARGETS:
            continue
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.eliminate_dead_code()
    return GraphModule(root, graph)


def _attr_name(target: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", _weight_name(target))


def _weight_name(target: str) -> str:
    """The model's own parameter name: without the capture wrapper's and peft's prefixes."""
    return target.removeprefix("model.").removeprefix("base_model.model.").replace(".base_layer.", ".")


def _canonicalize_conv1d(program: Program):
    """addmm(bias, x2d, W[in, out]) with W a weight -> linear(x, Wᵀ, bias): one linear form for all.

    GPT-2's Conv1D flattens x to 2-D for addmm and views the result back; when both views are there,
    the linear takes x itself and the views disappear, so patterns (LoRA over Conv1D) see one linear.
    """
    aten = torch.ops.aten
    for node in list(program.graph.nodes):
        if node.op != "call_function" or node.target != aten.addmm.default:
            continue
        bias, x, weight = node.args[:3]
        if weight.op != "get_attr" or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            continue
        transposed = program.add_weight(
            weight.target + "_t", program.get_weight(weight).t().contiguous(), like=weight, weight_name=weight.meta["weight_name"]
        )
        source, result = _unflattened(x, node)
        with program.graph.inserting_before(node):
            linear = program.graph.call_function(aten.linear.default, (source, transposed, bias))
        linear.meta.update(result.meta)
        result.replace_all_uses_with(linear)
        for dead in (result, node) if result is not node else (node,):
            program.graph.erase_node(dead)
    program.remove_unused_weights()


def _unflattened(x2d, addmm):
    """(x, view_back) when x2d = view(x, [-1, K]) and addmm's only use views it back to x's leading
    dims; else (x2d, addmm)."""
    views = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)
    users = list(addmm.users)
    if not (x2d.op == "call_function" and x2d.target in views and len(users) == 1 and users[0].target in views):
        return x2d, addmm
    x, back = x2d.args[0], users[0]
    lead_in, lead_out = x.meta["val"].shape[:-1], back.meta["val"].shape[:-1]
    if len(lead_in) == len(lead_out) and all(str(a) == str(b) for a, b in zip(lead_in, lead_out)):
        return x, back
    return x2d, addmm


def _unshare_weights(gm: GraphModule):
    """A weight read by several nodes (tied embeddings) gets one get_attr per reader, so a pass that
    replaces one reader's weight (quantizing the lm head, say) leaves the others as they were."""
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and len(n.users) > 1]:
        for i, user in enumerate(list(node.users)[1:], start=1):
            alias = f"{node.target}_tied{i}"
            gm.register_buffer(alias, getattr(gm, node.target))
            with gm.graph.inserting_after(node):
                copy = gm.graph.get_attr(alias)
            copy.meta.update(node.meta)
            user.replace_input_with(node, copy)


def _remove_identities(program: Program):
    """Inference-time no-ops (dropout with train=False, alias) are replaced by their input."""
    aten = torch.ops.aten
    for node in list(program.graph.nodes):
        is_eval_dropout = node.target == aten.dropout.default and (len(node.args) < 3 or node.args[2] is False)
        if node.op == "call_function" and (is_eval_dropout or node.target == aten.alias.default):
            node.replace_all_uses_with(node.args[0])
            program.graph.erase_node(node)
