"""Text files to token ids, and calibration batches of random windows.

Entry points: `tokenize_file(path, tokenizer)` gives the token stream `[n_tokens]` of a whole file;
`calibration_batches(tokens_or_path, tokenizer, n_samples, seq_len, seed)` and
`calibration_from_files(paths, tokenizer, ...)` give `[n_samples, seq_len]` windows for calibration.

A file is tokenized in one call of the (fast) tokenizer, without special tokens: the stream is the
one the reference model was trained and evaluated on, and the Rust tokenizer does a 6 MB file in a
few seconds. Windows do not overlap, so when a text holds fewer than `n_samples` windows, all of them
are used and a warning says how many.
"""
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from transformers import PreTrainedTokenizerBase

PathLike = Union[str, Path]


def load_text(path: PathLike) -> str:
    """The whole file as UTF-8 text."""
    return Path(path).read_text(encoding="utf-8")


def tokenize_file(path: PathLike, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Token ids of the whole file, `[n_tokens]` int64, without BOS/EOS."""
    encoded = tokenizer(
        load_text(path),
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # no "longer than model_max_length" warning: the stream is cut into windows later
    )
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def calibration_batches(
    token_ids_or_path: Union[torch.Tensor, PathLike],
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """`n_samples` random non-overlapping windows `[n, seq_len]` of a token stream or a text file."""
    if isinstance(token_ids_or_path, torch.Tensor):
        tokens = token_ids_or_path
    elif tokenizer is None:
        raise ValueError(f"calibration_batches: a tokenizer is needed to read {token_ids_or_path}")
    else:
        tokens = tokenize_file(token_ids_or_path, tokenizer)
    return _random_windows([tokens], n_samples, seq_len, seed)


def calibration_from_files(
    paths: Sequence[PathLike],
    tokenizer: PreTrainedTokenizerBase,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """Random windows `[n, seq_len]` drawn from several files; no window crosses a file boundary.

    Every window position of every file is equally likely, so files contribute in proportion to
    their length.
    """
    return _random_windows([tokenize_file(p, tokenizer) for p in paths], n_samples, seq_len, seed)


def _random_windows(
    streams: Sequence[torch.Tensor], n_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """Pick `n_samples` of the non-overlapping `seq_len` windows of the streams, at random.

    Each stream is cut into `len // seq_len` windows starting at a random shift (so the leftover
    tokens fall anywhere, not always at the end); windows are then drawn without replacement.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"calibration: n_samples={n_samples} and seq_len={seq_len} must both be at least 1 "
                         "(e.g. 128 windows of 512 tokens)")
    generator = torch.Generator().manual_seed(seed)
    windows = []
    for tokens in streams:  # tokens: [n]
        count = tokens.numel() // seq_len
        if count == 0:
            continue
        shift = int(torch.randint(0, tokens.numel() - count * seq_len + 1, (), generator=generator))
        windows.append(tokens[shift : shift + count * seq_len].view(count, seq_len))
    lengths = [t.numel() for t in streams]
    if not windows:
        raise ValueError(
            f"calibration: text too short for one window of seq_len={seq_len} tokens "
            f"(token counts: {lengths}); use a shorter seq_len or more text"
        )
    pool = torch.cat(windows)  # [total windows, seq_len]
    if pool.shape[0] < n_samples:
        warnings.warn(
            f"calibration: asked for {n_samples} windows of {seq_len} tokens, but the text "
            f"({sum(lengths)} tokens) holds only {pool.shape[0]}; using {pool.shape[0]}",
            stacklevel=3,
        )
    pick = torch.randperm(pool.shape[0], generator=generator)[:n_samples]
    return pool[pick].long()
