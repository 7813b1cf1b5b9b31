"""Shared measuring tools for llmopt's GPU benchmarks: timing, ceilings, and the result table.

Entry points: `time_ms(fn)` (CUDA events through triton's do_bench, warm-up, median of many),
`time_graph_ms(calls)` (the same, per call, of one CUDA graph replaying `calls` back to back),
`rel_err(out, ref)`,
`measure_ceilings()` (a large device copy for bandwidth, a large bf16 matmul for TFLOP/s, measured in
the same run as the cases), and `print_table(rows)` (markdown, also appended to a results file).
"""
import datetime
import os

import torch


def time_ms(fn, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median time of `fn()` in milliseconds, timed with CUDA events."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_graph_ms(calls: list) -> float:
    """Median ms per call of `calls` (closures, e.g. over distinct inputs), captured in one CUDA graph:
    Python's launch cost stays out of the GPU time."""
    from llmopt.codegen.kernels.tuning import capture_graph

    return time_ms(capture_graph(calls).replay) / len(calls)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def measure_ceilings() -> dict:
    """Measured memory bandwidth (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s)."""
    n_bytes = 4 * 1024**3
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b)
    return {
        "bandwidth_gbs": 2 * n_bytes / copy_ms / 1e6,
        "bf16_tflops": 2 * n**3 / mm_ms / 1e9,
        "device": torch.cuda.get_device_name(),
    }


def print_table(title: str, columns: list, rows: list, results_path: str = None) -> str:
    """Prints a markdown table; with `results_path` (or $LLMOPT_RESULTS) also appends it there."""
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    path = results_path or os.environ.get("LLMOPT_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")
    return text


def header(ceilings: dict) -> str:
    """One line naming the hardware, software and measured ceilings of this run."""
    import triton

    return (
        f"{datetime.date.today()} on {ceilings['device']}, torch {torch.__version__}, triton {triton.__version__}; "
        f"measured ceilings: copy {ceilings['bandwidth_gbs']:.0f} GB/s, bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s"
    )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
