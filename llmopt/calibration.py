"""The calibrator: runs a Program over calibration batches once and keeps per-channel statistics at
requested nodes, never all activations.

Entry point: `Calibration(batches)`; passes call `calibration.statistics(program, nodes)` ->
`{node: ChannelStats}` (max |x|, mean |x|, sum of squares per channel, and the token count) and
`calibration.samples(program, nodes, max_rows)` for searches that need a bounded sample of rows.
`Calibration.coerce(x)` accepts a LongTensor `[N, T]` of token ids or a list of such tensors.
"""
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llmopt.errors import PassError
from llmopt.token_ranges import vocabulary_problem


@dataclass
class ChannelStats:
    absmax: torch.Tensor  # [K] max |x_j|
    abssum: torch.Tensor  # [K] sum |x_j| (fp64)
    sumsq: torch.Tensor  # [K] sum x_j^2 (fp64)
    count: int  # tokens seen

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.count, 1)).float()

    @property
    def l2(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens."""
        return self.sumsq.sqrt().float()


class Calibration:
    def __init__(self, batches, batch_size: int = 8, progress: bool = True):
        self.batches = _token_batches(batches)  # [LongTensor [n, T]]
        self.batch_size = batch_size
        self.progress = progress

    @classmethod
    def coerce(cls, data):
        """None, a Calibration, a LongTensor [N, T] or a list of them -> Calibration or None."""
        if data is None or isinstance(data, Calibration):
            return data
        return cls(data)

    def check_fits(self, program) -> None:
        """PassError unless every token id lies in `program`'s vocabulary and every sequence in its context: checked
        before any pass runs, so a bad set fails at once, not deep inside the embedding after earlier passes."""
        vocab, context = program.vocab_size(), program.max_seq_len
        for t in self.batches:  # t: [n, T]
            problem = vocabulary_problem(t, vocab, "calibration")
            if problem:
                raise PassError(problem)
            if t.shape[1] > context:
                raise PassError(f"calibration sequences of {t.shape[1]} tokens exceed the model's context of "
                                f"{context}: cut them to at most {context} (seq_len= in "
                                "llmopt.data.calibration_batches, --seq-len in the CLI)")

    def _chunks(self):
        for t in self.batches:
            for start in range(0, t.shape[0], self.batch_size):
                yield t[start : start + self.batch_size]

    def _n_chunks(self) -> int:
        return sum((t.shape[0] + self.batch_size - 1) // self.batch_size for t in self.batches)

    def statistics(self, program, nodes) -> dict:
        """{node: ChannelStats} of the last dimension of each node's value over every calibration token."""
        stats = {}

        def record(node, x):
            x = x.detach().reshape(-1, x.shape[-1])  # [tokens, K]
            if not torch.isfinite(x).all():
                raise PassError(f"calibration activations at node {node.name} contain NaN or Inf: check the model's weights and dtype (fp16 overflow? try float32 or bfloat16)")
            xf = x.float().abs()
            s = stats.get(node)
            amax, asum, ssq = xf.amax(0), xf.double().sum(0), (xf.double() ** 2).sum(0)
            if s is None:
                stats[node] = ChannelStats(amax, asum, ssq, x.shape[0])
            else:
                s.absmax = torch.maximum(s.absmax, amax)
                s.abssum += asum
                s.sumsq += ssq
                s.count += x.shape[0]

        self._run(program, nodes, record, "calibrating")
        return stats

    def samples(self, program, nodes, max_rows: int = 4096, seed: int = 0) -> dict:
        """{node: Tensor [n <= max_rows, K]}: rows drawn evenly from every batch (reservoir-free)."""
        per_chunk = max(1, max_rows // max(self._n_chunks(), 1))
        gen = torch.Generator().manual_seed(seed)
        rows = {n: [] for n in nodes}

        def record(node, x):
            x = x.detach().reshape(-1, x.shape[-1])
            pick = torch.randperm(x.shape[0], generator=gen)[:per_chunk].to(x.device)
            rows[node].append(x[pick].float())

        self._run(program, nodes, record, "sampling activations")
        return {n: torch.cat(r)[:max_rows] for n, r in rows.items()}

    def _run(self, program, nodes, record, what):
        watched = set(nodes)

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n in watched:
                    record(n, out)
                return out

        recorder = Recorder(program.gm)
        device = program.device
        with torch.no_grad():
            for ids in tqdm(self._chunks(), total=self._n_chunks(), desc=what, disable=not self.progress, leave=False):
                ids = ids.to(device)
                pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
                recorder.run(ids, pos)


def _token_batches(data) -> list:
    """A LongTensor [N, T] (or [T]) or a list of them -> [LongTensor [n, T]], validated."""
    tensors = [data] if isinstance(data, torch.Tensor) else list(data)
    if not tensors or any(not isinstance(t, torch.Tensor) for t in tensors):
        raise PassError("calibration must be a LongTensor [N, T] of token ids or a non-empty list of them")
    tensors = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    for t in tensors:
        if t.dtype not in (torch.int64, torch.int32) or t.dim() != 2 or t.numel() == 0:
            raise PassError(f"calibration tensors must be non-empty integer token ids [N, T]; got {t.dtype} {list(t.shape)}")
    return tensors
