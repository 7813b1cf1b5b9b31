"""Generated kernel modules written to a cache directory and imported from there.

Entry point: `load(source) -> launcher` (the module's launcher function).

`@triton.jit` reads its function's source with `inspect`, so a generated kernel must live in a real
file. Each module is written once as `<group name>_<hash>.py` under `cache_dir()` (the
`LLMOPT_KERNEL_CACHE` environment variable, else `<tmp>/llmopt-fusion`), atomically (concurrent
processes write the same bytes), and imported once a process.
"""
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

_MODULES = {}  # digest of the source -> its imported module


def cache_dir() -> Path:
    path = Path(os.environ.get("LLMOPT_KERNEL_CACHE") or Path(tempfile.gettempdir()) / "llmopt-fusion")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(source):
    """Import `source` (an `emit.KernelSource`) from its file and return its launcher."""
    digest = hashlib.sha256(source.text.encode()).hexdigest()[:16]
    if digest not in _MODULES:
        path = cache_dir() / f"{source.name}_{digest}.py"
        if not path.exists():
            partial = path.with_suffix(f".{os.getpid()}.part")
            partial.write_text(source.text)
            os.replace(partial, path)
        module_name = f"llmopt_fusion_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # triton and inspect look kernels' modules up by name
        spec.loader.exec_module(module)
        _MODULES[digest] = module
    return getattr(_MODULES[digest], source.launcher)
