"""`CompiledModel`: what `llmopt.compile` returns. Called like the model, generates, reports.

Entry point: `CompiledModel(program, report, backend)`; `cm(input_ids) -> logits [B, T, V]`,
`cm.generate(input_ids, max_new_tokens, ...)`, `cm.program`, `cm.report()`.
"""
import numbers

import torch

from llmopt.errors import DeviceMemoryError, LlmoptError
from llmopt.token_ranges import first_outside, vocabulary_problem


class CompiledModel:
    def __init__(self, program, pass_records, backend: str, bytes_before: int, runner=None):
        self.program = program
        self.pass_records = pass_records
        self.backend = backend
        self.bytes_before = bytes_before
        self._runner = runner or program.run
        self._vocab_size = None  # rows of the embedding, read on the first call

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor = None) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V]; position_ids: [B, T], [1, T] or [T] (default 0 .. T - 1)."""
        input_ids = self._checked_ids(input_ids)
        if input_ids.shape[-1] > self.program.max_seq_len:
            raise LlmoptError(
                f"the prompt has {input_ids.shape[-1]} tokens but the model's context is {self.program.max_seq_len}: "
                "truncate it (input_ids[:, -max_len:]) or use a model with a longer context"
            )
        if position_ids is not None:
            position_ids = _checked_positions(position_ids, input_ids, self.program.max_seq_len)
        return self._forward(input_ids, position_ids)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = None, top_p: float = None, eos_token_id=None, generator: torch.Generator = None) -> torch.Tensor:
        """input_ids: [B, T] -> [B, T + n] with n <= max_new_tokens (greedy unless do_sample)."""
        from llmopt.sampling import check_sampling_options, sample_next

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise LlmoptError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
        if do_sample:
            check_sampling_options(temperature, top_k, top_p)
        ids = self._checked_ids(input_ids)
        if ids.shape[-1] + max_new_tokens > self.program.max_seq_len:
            raise LlmoptError(
                f"prompt ({ids.shape[-1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                f"{self.program.max_seq_len} tokens: shorten the prompt or ask for fewer tokens"
            )
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            logits = self._forward(ids, None, generated=step)[:, -1, :]  # [B, V]; every id is checked or generated
            nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)  # [B]
            if eos:
                pad = next(iter(eos))
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                finished |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos and bool(finished.all()):
                break
        return ids

    def _forward(self, ids: torch.Tensor, position_ids, generated: int = 0) -> torch.Tensor:
        """The runner's logits [B, T, V]; running out of device memory becomes a DeviceMemoryError that names what
        to shrink and, inside generate, keeps the `generated` tokens made so far (ids: [B, T])."""
        try:
            return self._runner(ids, position_ids)
        except torch.OutOfMemoryError as err:
            batch, tokens = ids.shape
            kept = f"; the {generated} tokens generated so far are in this error's .partial" if generated else ""
            raise DeviceMemoryError(
                f"out of {ids.device.type} memory running {batch} sequences of {tokens} tokens "
                f"({str(err).splitlines()[0]}): run fewer sequences a call or shorter ones{kept}",
                partial=ids if generated else None,
            ) from err

    def _checked_ids(self, input_ids) -> torch.Tensor:
        """Token ids as given -> [B, T] long on the program's device, every id in the vocabulary (an id outside
        it would fail deep inside the embedding, on a GPU as a device-side assert that ends the process's CUDA)."""
        ids = _as_batch(input_ids)  # [B, T]
        if self._vocab_size is None:
            self._vocab_size = self.program.vocab_size()
        problem = vocabulary_problem(ids, self._vocab_size, "input_ids")
        if problem:
            raise LlmoptError(problem)
        return ids.to(device=self.program.device, dtype=torch.long)

    def save(self, directory):
        """Write this model to `directory` (weights as safetensors + llmopt.json); `llmopt.load` reads it back."""
        from llmopt.serialize import save

        return save(self, directory)

    def report(self) -> str:
        """Passes run (time and stats of each), parameter bytes before and after, and with backend="triton"
        which 2:4 sparse linears run on sparse kernels (and why the others do not)."""
        lines = [f"llmopt compiled model (backend: {self.backend})", "", "| pass | seconds | changed | stats |", "| --- | --- | --- | --- |"]
        for r in self.pass_records:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            lines.append(f"| {r.name} | {r.seconds:.3f} | {r.changed} | {stats} |")
        after = self.program.parameter_bytes()
        lines += ["", f"parameter bytes: {self.bytes_before / 1e6:.2f} MB before, {after / 1e6:.2f} MB after ({after / max(self.bytes_before, 1):.2%})"]
        sparse = getattr(self._runner, "sparse", None)  # backend="triton": linears on 2:4 kernels (codegen/sparse.py)
        summary = sparse.summary() if sparse is not None else ""
        if summary:
            lines += ["", summary]
        return "\n".join(lines)


def _as_batch(input_ids) -> torch.Tensor:
    """Token ids as given (a list, [T] or [B, T]) -> [B, T] integer tensor; LlmoptError for anything else."""
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.tensor(input_ids)
        except (TypeError, ValueError) as err:
            raise LlmoptError(f"input_ids must be integer token ids [B, T] ({err}): rows of different lengths are "
                              "padded to one length, or run one prompt a call") from err
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise LlmoptError(f"input_ids must be integer token ids [B, T]; got {input_ids.dtype} {list(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise LlmoptError(f"input_ids {list(input_ids.shape)} holds no token: give at least one token a sequence "
                          "(e.g. the tokenizer's BOS token)")
    return input_ids


def _checked_positions(position_ids, input_ids: torch.Tensor, context: int) -> torch.Tensor:
    """position_ids as given ([B, T], [1, T] or [T]) -> [B, T] long on input_ids' device, each in [0, context);
    LlmoptError otherwise."""
    batch, tokens = input_ids.shape
    positions = torch.as_tensor(position_ids)
    if positions.dim() == 1:
        positions = positions[None]
    if positions.dtype not in (torch.int64, torch.int32) or positions.dim() != 2 or positions.shape[1] != tokens \
            or positions.shape[0] not in (1, batch):
        raise LlmoptError(f"position_ids must be integer positions [B, T] (or [1, T], [T]) matching input_ids "
                          f"{[batch, tokens]}; got {positions.dtype} {list(positions.shape)}")
    bad = first_outside(positions, context)
    if bad is not None:
        raise LlmoptError(f"position_ids holds position {bad}, outside the model's context of {context} (positions 0 "
                          f"to {context - 1})")
    return positions.expand(batch, tokens).to(device=input_ids.device, dtype=torch.long).contiguous()
