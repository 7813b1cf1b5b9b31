"""`AWQ(bits=4, group_size=128, grid=20, symmetric=False, max_rows=4096, include_lm_head=False, duo_scaling=True,
separate_clip=True, clip_sweeps=3, rounding="learned", gqa_vo=False, tune_steps=50)`:
activation-aware weight quantization (Lin et al. 2023) into `torch.ops.llmopt.linear_wq`. Lossy.

For each input group (`llmopt.producers.input_groups`: q/k/v after the attention norm, gate/up after
the MLP norm, v→o, up→down, fc1→fc2 through ReLU; an 'other' producer such as GELU gets an inserted
scale node; v→o under GQA only with `gqa_vo=True`, see the class docstring):
1. search s = mean|x|^α, α ∈ {0, 1/grid, ..., 1} (and with `duo_scaling` also AutoAWQ's
   mean|x|^α / mean|ŵ|^(1−α)), by the group's quantized output error (`compress.search_awq_scales`;
   plain α = 0 is RTN) and fold it exactly (`producers.fold_scales`); where one producer channel
   feeds several inputs (v→o under GQA: each v channel is read by every query head of its KV head),
   the candidates take one scale per producer channel, from the means pooled over its inputs
   (`InputGroup.ties`);
2. per linear, search the clip of every weight group on x / s (`compress.search_awq_clip`): with
   `separate_clip` (the default) the group's max and min shrink by separate ratios (OmniQuant's
   learnable clipping, as a grid), else one ratio shrinks max|w| (AutoAWQ's clip); each group's
   clip is first chosen by its own share of the output error, then `clip_sweeps` sweeps of
   coordinate descent over each row's groups re-choose it by the row's whole output error (the
   cross-group terms the per-group error leaves out);
3. quantize: round to nearest with that clip (`compress.quantize_groups`, `rounding="nearest"`: the
   paper's AWQ), then by default (`rounding="learned"`) tune the rounding and group scales of the
   stage's linears together by SignRound on the stage's block of the graph against the float model's
   outputs (`awq_tune.tune_stage`, see below); or with `rounding="gptq"` round by GPTQ's error
   feedback on the same calibration rows under the same group ranges (`compress.gptq_quantize`; the
   AWQ paper notes the two combine); the linears become `linear_wq` at the end (`rtn.to_linear_wq`),
   holding their dequantized weights until then.

Calibration runs layer by layer, in one staged pass over the calibration chunks rather than one
calibrator run per layer (L forward passes) or one run sampling every group up front (which can't
see the earlier layers' changes). A stage is the groups that must change together (v→o folds into
v, so q/k/v and o form one stage unless o is not scaled); it starts at the first node its changes
touch. Per chunk only the values live at the current cut are kept (residual stream, RoPE tables,
mask: one layer's worth). For each stage:
a. advance: run every chunk from the cut to the stage's start, with the earlier stages already
   quantized, so later layers are calibrated on the model as it will run (the AWQ paper's layer-
   sequential order; like AutoAWQ but with quantized, not float, earlier layers);
b. sample: run on to the stage's inputs, keeping at most `max_rows` rows per group, drawn evenly
   from every chunk (the searches subsample to that many anyway);
c. search, fold, clip and quantize the stage's linears;
d. with learned rounding, tune them on the stage's block (from the stage's start to the next stage's):
   the inputs are the chunks as the cut keeps them, the targets the float model's values at the
   block's end, run by a second staged run over the Program as it was (so each block also corrects
   what the quantized blocks before it left in its inputs); chunks then hold TUNE_CHUNK_TOKENS tokens,
   one signed-gradient step reading one chunk.
Each node runs once per chunk, the stages' own segments twice: about 1.5 forward passes in all; learned
rounding adds the float run (one forward pass) and `tune_steps` forward and backward passes of one chunk
through every block.
NaN/Inf calibration activations raise a PassError; on any failure the Program is restored as it was
before the pass (weights are replaced, never written in place, so the restore copies no tensor).
"""
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from llmopt.errors import PassError
from llmopt.passes.awq_tune import tune_stage
from llmopt.passes.compress.awq import MAX_TOKENS, search_awq_clip, search_awq_scales
from llmopt.passes.compress.gptq import gptq_quantize
from llmopt.passes.compress.learned_rounding import STEPS
from llmopt.passes.compress.rtn import quantize_groups
from llmopt.passes.rtn import (
    all_finite,
    check_format,
    check_finite,
    check_group_quantizable,
    checked_calibration,
    linear_targets,
    to_linear_wq,
)
from llmopt.passes_api import Pass, PassResult
from llmopt.producers import fold_scales, input_groups
from llmopt.program import Program

ROUNDINGS = ("nearest", "gptq", "learned")
# calibration tokens a chunk with learned rounding (one signed-gradient step reads one chunk): on the reference
# model 512 closed 67-77% of RTN's gap at w4 over three calibration draws in 49 s, 1024 70-80% in 68 s (RESULTS.md)
TUNE_CHUNK_TOKENS = 512


@dataclass
class Stage:
    groups: list  # [InputGroup], in graph order
    start: Node  # the first node whose value the stage's folds or quantization change


def scalable(group, gqa_vo: bool = True) -> bool:
    """Whether s is searched and folded: into a norm or a producer linear (one with tied channels, v→o
    under GQA, only with `gqa_vo`), or as an inserted scale node."""
    return group.kind == "other" or (group.foldable and (gqa_vo or group.ties is None))


def plan_stages(program, groups, targets, gqa_vo: bool = True) -> list:
    """Groups -> [Stage] with non-decreasing starts; a group whose fold rescales a linear that an
    earlier stage quantizes joins that stage (with every stage in between); `gqa_vo` as in `scalable`."""
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    stages, owner = [], {}  # owner: linear node -> index of the stage that quantizes it
    for g in sorted(groups, key=lambda g: order[g.value]):
        producer = g.producer.node if g.kind == "linear" and scalable(g, gqa_vo) else None
        if producer in owner:
            j = owner[producer]
            stages[j:] = [[h for stage in stages[j:] for h in stage]]
            owner = {n: min(i, j) for n, i in owner.items()}
        else:
            stages.append([])
        stages[-1].append(g)
        owner.update({c.node: len(stages) - 1 for c in g.consumers if c.node in targets})
    starts = [min((n for g in stage for n in _touched(g, gqa_vo)), key=order.__getitem__) for stage in stages]
    i = 1
    while i < len(stages):  # a stage starting before its predecessor would change values already kept
        if order[starts[i]] < order[starts[i - 1]]:
            stages[i - 1] += stages.pop(i)
            starts[i - 1] = starts.pop(i)
            i = max(i - 1, 1)
        else:
            i += 1
    return [Stage(stage, start) for stage, start in zip(stages, starts)]


def _touched(group, gqa_vo: bool) -> list:
    """Nodes whose values change when the group is scaled (if `scalable`) and quantized."""
    weights = [c.weight for c in group.consumers]
    if group.kind == "norm":
        weights += [group.norm.weight, group.norm.bias]
    elif group.kind == "linear" and scalable(group, gqa_vo):
        weights += [group.producer.weight, group.producer.bias]
    nodes = [user for w in weights if w is not None for user in w.users]
    return nodes + ([group.value] if group.kind == "other" else [])  # the scale node goes right after it


class StagedRun:
    """The Program run over the calibration chunks in segments, keeping per chunk only the values
    live at the cut (the first node not yet run)."""

    def __init__(self, program, calibration, chunk_rows: int = None):
        """`chunk_rows`: calibration rows (sequences) a chunk; the calibration's batch size by default."""
        self.program = program
        ids_node, pos_node = program.nodes("placeholder")
        self.envs = []
        for batch in calibration.batches:
            for ids in batch.split(chunk_rows or calibration.batch_size):  # ids: [b, T]
                ids = ids.to(program.device)
                pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
                self.envs.append({ids_node: ids, pos_node: pos})
        self.cut = next(iter(program.graph.nodes))

    def advance(self, start: Node) -> None:
        """Run every chunk up to (not including) `start`; keep the values used from `start` on."""
        order, nodes = self._order()
        segment = nodes[order[self.cut] : order[start]]
        live = set(self.live_at(start))
        for i, env in enumerate(self.envs):
            self.envs[i] = self._execute(env, segment, live)  # env is consumed
        self.cut = start

    def sample(self, values: dict, max_rows: int) -> dict:
        """values: {node: name for messages} -> {node: [<= max_rows, K] fp32 rows}; the cut stays."""
        order, nodes = self._order()
        segment = nodes[order[self.cut] : max(order[v] for v in values) + 1]
        per_chunk = -(-max_rows // len(self.envs))
        gen = torch.Generator().manual_seed(0)
        rows = {v: [] for v in values}
        for env in self.envs:
            computed = self._execute(dict(env), segment, set(values))
            for v, name in values.items():
                x = computed[v].reshape(-1, computed[v].shape[-1])  # [tokens, K]
                if not all_finite(x):
                    raise PassError(
                        f"AWQ: calibration activations at node {v.name} (the input of {name}) contain NaN or Inf: "
                        "check the model's weights and dtype (fp16 overflow? try float32 or bfloat16); the Program is left unchanged"
                    )
                pick = torch.randperm(x.shape[0], generator=gen)[:per_chunk].to(x.device)
                rows[v].append(x[pick].float())
        return {v: torch.cat(r)[:max_rows] for v, r in rows.items()}

    def segment(self, index: int, end: Node, weights: dict, keep: set) -> dict:
        """Run chunk `index` from the cut to `end` (not included) with the weights of the get_attr nodes in
        `weights` replaced (gradients flow into them) -> {node: value} of the nodes in `keep`; the cut stays."""
        order, nodes = self._order()
        return self._execute(dict(self.envs[index]), nodes[order[self.cut] : order[end]], keep, weights, grad=True)

    def live_at(self, node: Node) -> list:
        """The values computed before `node` that it or a later node reads (what a chunk keeps at that cut)."""
        order, nodes = self._order()
        return [n for n in nodes[: order[node]] if n.op != "get_attr" and any(order[u] >= order[node] for u in n.users)]

    def _order(self):
        nodes = list(self.program.graph.nodes)
        return {n: i for i, n in enumerate(nodes)}, nodes

    def _execute(self, values: dict, segment: list, keep: set, weights: dict = None, grad: bool = False) -> dict:
        """Run `segment` on one chunk's `values` (consumed) -> {node: value} of the nodes in `keep`, with the
        get_attr nodes in `weights` reading those tensors instead, under autograd if `grad`. A value is dropped
        after its last use in the segment, as eager mode does, so memory holds little more than what is live."""
        last_use = {a: i for i, n in enumerate(segment) for a in n.all_input_nodes}
        values.update({n: self.program.get_weight(n) for n in self.program.nodes("get_attr")})
        values.update(weights or {})
        with torch.set_grad_enabled(grad):
            for i, n in enumerate(segment):
                if n.op == "call_function":
                    args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
                    values[n] = n.target(*args, **kwargs)
                for a in n.all_input_nodes:
                    if last_use[a] == i and a not in keep:
                        del values[a]
        return {n: values[n] for n in keep}


def _is_scaling(found) -> bool:
    """False for the search's RTN candidate (plain α = 0: s = 1), which needs no fold."""
    return found.alpha > 0 or found.duo


def _snapshot(program) -> GraphModule:
    """The Program's graph (copied) over its current weight tensors (shared, not copied)."""
    root = torch.nn.Module()
    for name, tensor in program.weights().items():
        root.register_buffer(name, tensor)
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(program.graph, {}))
    return GraphModule(root, graph)


class AWQ(Pass):
    """Activation-aware scaling, clip search and group quantization; see the module docstring.

    `separate_clip=True` searches, per weight group, the shrink of its max and of its min separately
    (every pair on the clip grid, and AutoAWQ's one-ratio candidates). Measured on the whole WikiText-2
    test set (ref-llama-12m, benchmarks/quality.py), the share of RTN's perplexity gap closed went from
    36% to 44% (w3g128) and 23% to 24% (w4g128), with injected outliers from 52% to 57% (w3) and 68% to
    65% (w4), for about 1.5x the pass time (7 -> 10.5 s on 2 CPU cores). `separate_clip=False` is
    AutoAWQ's clip (one ratio of max|w|).

    `clip_sweeps=3` then re-chooses each group's clip by coordinate descent on its row's whole output
    error (`compress.search_awq_clip(joint_sweeps=...)`): on the same benchmark 24% -> 34% (w4) and
    44% -> 45% (w3), with outliers 65% -> 69% (w4) and 57% -> 61% (w3), for about twice the pass time
    (10.3 -> 19.8 s on 2 CPU cores; 105 -> 163 s for a Llama-2-7B shape on an H200). 0 turns it off.

    `rounding="gptq"` rounds each linear's codes by GPTQ's error feedback (`compress.gptq_quantize`)
    instead of to nearest, on the `max_rows` calibration rows the searches use (raise `max_rows` to
    at least K for wide layers: the Gram matrix of fewer rows is rank-deficient and only the damping
    holds it). On the first 300 WikiText-2 test windows (benchmarks/RESULTS.md, session 8) it closed
    6-7 points more of RTN's gap on average over three calibration draws, with a spread of -12 to +18;
    on the whole test set 39% / 53% (reference w4 / w3) and 68% / 65% (outliers) against 34 / 45 / 69 / 61%.

    `rounding="learned"` (the default) tunes, after the searches, each stage's codes and group scales by
    SignRound (`compress.learned_rounding`): an offset in [-0.5, 0.5] per weight before rounding and a
    multiplier in [0.5, 1.5] per group scale, `tune_steps` signed-gradient steps on the error of the stage's
    block outputs against the float model's, kept only where that error fell. Why: on the reference model,
    which has no salient activation channels, the scale search has almost nothing to do (its best scale
    lowers the per-linear error by under 2%), and every per-linear objective tried (the searches, GPTQ,
    bias correction, least-squares scales) left perplexity where it was; what the model loses is the
    error of whole blocks through softmax and SiLU·up, and of the earlier quantized layers in their
    inputs. On the first 300 WikiText-2 test windows it closed 67-77% of RTN's gap at w4 over three
    calibration draws, against 10-41% for round to nearest (benchmarks/RESULTS.md has the whole test set).
    `rounding="nearest"` is the paper's AWQ.

    `gqa_vo=True` searches v→o under GQA too, with one scale per v channel (its o_proj inputs tied), folded
    into v's rows; off by default, as AutoAWQ leaves it out. On the reference model (6 query heads on 2 KV
    heads) it lowered o_proj's output error by 0-8% but closed 23 / 43 / 68 / 60% of RTN's gap on the
    whole WikiText-2 test set against 34 / 45 / 69 / 61% without it (benchmarks/RESULTS.md, session 9).
    """

    exact = False
    needs_calibration = True
    once = True
    quantizes = True
    rewrites_float_linears = True

    def __init__(self, bits: int = 4, group_size: int = 128, grid: int = 20, symmetric: bool = False,
                 max_rows: int = MAX_TOKENS, include_lm_head: bool = False, duo_scaling: bool = True,
                 separate_clip: bool = True, clip_sweeps: int = 3, rounding: str = "learned", gqa_vo: bool = False,
                 tune_steps: int = STEPS):
        check_format(bits, group_size, "AWQ")
        if grid < 1 or max_rows < 1:
            raise PassError(f"AWQ: grid={grid} and max_rows={max_rows} must be >= 1 (defaults 20 and {MAX_TOKENS})")
        if clip_sweeps < 0:
            raise PassError(f"AWQ: clip_sweeps={clip_sweeps} must be >= 0 (0: each group's clip by its own error)")
        if rounding not in ROUNDINGS:
            raise PassError(f"AWQ: rounding={rounding!r} is not supported; use 'nearest' (the paper's), 'gptq' or 'learned'")
        if tune_steps < 0:
            raise PassError(f"AWQ: tune_steps={tune_steps} must be >= 0 (the signed-gradient steps of rounding='learned')")
        self.bits, self.group_size, self.grid, self.symmetric = bits, group_size, grid, symmetric
        self.rounding, self.tune_steps = rounding, tune_steps
        self.max_rows, self.include_lm_head, self.duo_scaling = max_rows, include_lm_head, duo_scaling
        self.separate_clip, self.clip_sweeps, self.gqa_vo = separate_clip, clip_sweeps, gqa_vo

    def check(self, program, calibration):
        super().check(program, checked_calibration(calibration, self.name))
        targets = linear_targets(program, self.include_lm_head)
        check_finite(program, targets, self.name)
        check_group_quantizable(program, targets, self.bits, self.group_size, self.name)

    def apply(self, program, calibration):
        calibration = checked_calibration(calibration, self.name)
        targets = {lin.node for lin in linear_targets(program, self.include_lm_head)}
        groups = [g for g in input_groups(program, self.include_lm_head) if any(c.node in targets for c in g.consumers)]
        backup, finished = _snapshot(program), False
        scaled, quantized = [], []  # scaled: [(InputGroup, AwqScales)]; quantized: [(Linear, QuantizedWeight)]
        tuned = []  # [TunedStage | None] per stage, with rounding="learned"
        try:
            learned = self.rounding == "learned"
            chunk_rows = max(1, TUNE_CHUNK_TOKENS // calibration.batches[0].shape[1]) if learned else None
            run = StagedRun(program, calibration, chunk_rows)
            reference = StagedRun(Program(backup, program.config, program.max_seq_len), calibration, chunk_rows) if learned else None
            stages = plan_stages(program, groups, targets, self.gqa_vo)
            for i, stage in enumerate(stages):
                run.advance(stage.start)
                rows = run.sample({g.value: g.name for g in stage.groups}, self.max_rows)
                entries = []  # [(Linear, float weight, QuantizedWeight)]
                scaled += self._quantize_stage(program, stage, rows, targets, entries)
                if learned:
                    end = stages[i + 1].start if i + 1 < len(stages) else _block_end(program, targets)
                    tuned.append(tune_stage(run, reference, end, entries, self.tune_steps))
                    if tuned[-1] is not None:
                        entries = [(lin, None, qw) for lin, qw in tuned[-1].quantized]
                        for lin, _, qw in entries:
                            program.set_weight(lin.weight, qw.dequantize())
                quantized += [(lin, qw) for lin, _, qw in entries]
            for lin, qw in quantized:
                to_linear_wq(program, lin, qw)
            program.remove_unused_weights()
            program.recompile()
            finished = True
        except ValueError as err:  # from the searches, e.g. a non-finite error: refused like bad input
            raise PassError(f"AWQ: {err}") from err
        finally:
            if not finished:
                program.gm = backup  # whatever failed, the Program is left as it was
        stats = {
            "linears_quantized": len(quantized),
            "groups_scaled": sum(1 for _, found in scaled if _is_scaling(found)),
            "scale_nodes_inserted": sum(1 for g, found in scaled if _is_scaling(found) and g.kind == "other"),
            "groups": [g.name for g, _ in scaled],  # the searched groups, in graph order; the lists below follow it
            "alphas": [found.alpha for _, found in scaled],
            "duo": [found.duo for _, found in scaled],
            # the chosen scale's output error over plain RTN's (s = 1) on the search's objective, <= 1
            "error_vs_rtn": [float(found.errors.min() / found.errors[0, 0]) for _, found in scaled],
        }
        if self.rounding == "learned":
            stats["stages_tuned"] = sum(1 for t in tuned if t is not None and t.accepted)
            stats["stages_not_tunable"] = sum(1 for t in tuned if t is None)
            # per stage, the block's loss after tuning over before (1.0: not tuned or not accepted)
            stats["tune_loss_ratio"] = [t.loss_after / t.loss_before if t is not None and t.accepted else 1.0 for t in tuned]
        return PassResult(program, bool(quantized), stats)

    def _quantize_stage(self, program, stage, rows, targets, entries: list) -> list:
        """Scale every group of the stage (folding s unless the search picked plain α = 0, i.e. s = 1), then
        clip-search and quantize its linears; each gets its dequantized weight (what linear_wq computes
        with: later stages are calibrated on the quantized model without the op's per-call unpacking)
        and an entry (Linear, float weight, QuantizedWeight) in `entries`. -> [(group, AwqScales)] of the
        groups searched. Learned rounding starts from round to nearest."""
        inputs, scaled = [], []  # inputs: [(Linear, x [n, K] as the linear now sees it)]
        for g in stage.groups:
            x = rows[g.value]  # [n, K]
            mine = [c for c in g.consumers if c.node in targets]
            if scalable(g, self.gqa_vo):
                weights = [program.get_weight(c.weight) for c in mine]
                found = search_awq_scales(x, weights, self.bits, self.group_size, self.grid, self.symmetric, self.max_rows,
                                          duo=self.duo_scaling, ties=g.ties)
                if _is_scaling(found):
                    fold_scales(program, g, found.scales)
                    x = x / found.scales.to(x.device)
                scaled.append((g, found))
            inputs += [(c, x) for c in mine]
        for lin, x in inputs:  # after every fold: v's weight is final only once o's s is folded into it
            w = program.get_weight(lin.weight)
            clip = search_awq_clip(x, w, self.bits, self.group_size, symmetric=self.symmetric, max_tokens=self.max_rows,
                                   separate=self.separate_clip, joint_sweeps=self.clip_sweeps)
            if self.rounding == "gptq":
                qw = gptq_quantize(w, x, self.bits, self.group_size, self.symmetric, clip)
            else:
                qw = quantize_groups(w, self.bits, self.group_size, self.symmetric, clip)
            program.set_weight(lin.weight, qw.dequantize())
            entries.append((lin, w, qw))
        return scaled


def _block_end(program, targets) -> Node:
    """Where the last stage's block ends: at the lm head when it stays in float, else at the graph's output."""
    head = program.lm_head()
    if head is not None and head.node not in targets:
        return head.node
    return next(n for n in program.graph.nodes if n.op == "output")
