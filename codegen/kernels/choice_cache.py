"""First-use tuning choices kept on disk, so that a new process reuses them instead of timing the configs again.

Entry point: `ChoiceCache(kernel, sources, choices)`, one per kernel that tunes itself on first use (the Gluon W4A16
kernels through `w4a16_first_use.first_use_config`, the TMA W8A8 GEMM); `.get(key, device)` -> the kept choice or
`MISSING`, `.put(key, device, choice)`, key being the tuning key without the device (the device is named by what it
is). Triton's own autotuners keep their choices with `cache_results=True` (`tuning.py`); this does the same for
llmopt's hand-rolled tuning, in the same place and under the same file suffix (`<Triton cache dir>/llmopt/
*.autotune.json`), so clearing Triton's cache clears these too.

A choice is kept under its kernel's sources (the bytes of the kernel's file and its tuning's) and candidate list,
the GPU (name, compute capability, SM count), the Triton, torch and CUDA versions, and the tuning key: any change
there times the configs again. What is read back must be one of the candidates, or it is ignored; a file that cannot
be read or written is skipped (the choice is then only kept in this process), never an error: the cache saves time,
it is not needed for an answer.
"""
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
import triton

MISSING = object()  # get's answer for a key with no choice kept


class ChoiceCache:
    """kernel: its name (the files' prefix); sources: the files whose code the choice depends on (the kernel's and
    its tuning's; their bytes are part of every key); choices: every choice tuning can make (tuples of JSON scalars,
    or None)."""

    def __init__(self, kernel: str, sources: list, choices: list):
        self.kernel = kernel
        self.choices = list(choices)
        code = b"".join(Path(source).read_bytes() for source in sources)
        self._source = hashlib.sha256(code + repr(self.choices).encode()).hexdigest()
        self._memory = {}  # (device index, key) -> choice, this process's

    def get(self, key: tuple, device: torch.device):
        """key: the tuning key -> the choice kept for it on device, in this process or on disk, or MISSING."""
        kept = (_index(device), key)
        if kept not in self._memory:
            choice = self._read(self._path(key, device))
            if choice is MISSING:
                return MISSING
            self._memory[kept] = choice
        return self._memory[kept]

    def put(self, key: tuple, device: torch.device, choice):
        """Keeps choice for key on device, in this process and on disk; returns it."""
        self._memory[(_index(device), key)] = choice
        self._write(self._path(key, device), key, device, choice)
        return choice

    def _path(self, key: tuple, device: torch.device) -> Path:
        text = repr((self.kernel, self._source, describe_gpu(device), _text(key)))
        return directory() / f"{self.kernel}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.autotune.json"

    def _read(self, path: Path):
        try:
            stored = json.loads(path.read_text())["choice"]
        except (OSError, ValueError, KeyError, TypeError):
            return MISSING
        choice = tuple(stored) if isinstance(stored, list) else stored
        return choice if choice in self.choices else MISSING

    def _write(self, path: Path, key: tuple, device: torch.device, choice):
        record = {"kernel": self.kernel, "device": describe_gpu(device), "key": list(_text(key)),
                  "choice": choice}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
                json.dump(record, tmp)
            os.replace(tmp.name, path)  # whole or not at all, when processes tune at once
        except OSError:
            if tmp is not None:
                Path(tmp.name).unlink(missing_ok=True)


def directory() -> Path:
    """Where the choices are kept: the `llmopt` folder of Triton's cache directory (TRITON_CACHE_DIR)."""
    return Path(triton.knobs.cache.dir) / "llmopt"


def describe_gpu(device: torch.device) -> str:
    """The GPU a choice was timed on and the software that timed it, as text."""
    return _describe_gpu(_index(device))


@functools.cache
def _describe_gpu(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return (f"{props.name} sm_{props.major}{props.minor} {props.multi_processor_count} SMs, "
            f"triton {triton.__version__}, torch {torch.__version__}, cuda {torch.version.cuda}")


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _text(key: tuple) -> tuple:
    """The tuning key as text, the same in every process (a dtype as 'torch.bfloat16')."""
    return tuple(str(v) for v in key)
