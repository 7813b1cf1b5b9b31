"""2:4 semi-structured sparse linear (torch's cuSPARSELt / CUTLASS kernels) against the dense bf16 linear,
at Llama-2-7B linear shapes in prefill.

Entry point: `run(ceilings) -> list[dict]`; `python -m benchmarks.bench_sparse` measures the ceilings
(benchmarks/common.py), runs every case and prints one table. A case: W [N, K] bf16, pruned 2:4 by
magnitude, and x [M, K] bf16. Dense: `F.linear(x, W)` (cuBLAS). 2:4: the lowering's op,
`semi_structured_linear(x, compress(W, backend))`, on the backend `llmopt.codegen.sparse` picks for
this GPU (cuSPARSELt on the H200). Both are captured in a CUDA graph and timed as graph replays, so
Python's launch cost stays out of GPU times ("2:4 eager ms" times the same op launched from Python,
as the lowered prefill graph runs it: torch's sparse tensor subclass dispatches in Python). do_bench
clears L2 before every repetition. Formulas:
- TFLOP/s = 2·M·N·K / time for both, so the 2:4 rate is dense-equivalent (the sparse kernel does half
  the multiply-adds; its rate is what a dense GEMM would need to finish as fast);
- speed-up = dense time / 2:4 time; the sparse tensor cores bound it by 2x; "2:4 / bf16 ceiling" is
  the dense-equivalent rate over the measured bf16 matmul rate (an 8192³ matmul, same run);
- rel err = ‖y_2:4 − y_dense‖ / ‖y_dense‖ with the same pruned W (bf16 output rounding, ~1e-3).
"""
import torch

from benchmarks.common import header, measure_ceilings, print_table, rel_err, time_graph_ms, time_ms
from llmopt.codegen.sparse import SparseDevice, compress, semi_structured_linear, sparse_backend
from llmopt.passes.compress import magnitude_scores, prune_mask

LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K) of W: [N, K], y = x @ Wᵀ
TOKENS = [2048, 8192]
COLUMNS = [
    "M", "N x K", "dense ms", "2:4 ms", "dense TFLOP/s", "2:4 TFLOP/s (dense-equiv.)", "speed-up",
    "2:4 / bf16 ceiling", "2:4 eager ms", "rel err", "backend",
]


def sparse_case(m: int, n: int, k: int, backend: str, ceilings: dict) -> dict:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5  # [N, K]
    w = w * prune_mask(magnitude_scores(w), pattern="2:4")  # [N, K], 2 zeros in every 4 inputs
    sparse = compress(w, backend)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # x: [M, K]
    y_dense = torch.nn.functional.linear(x, w)  # [M, N]
    y = semi_structured_linear(x, sparse)
    err = rel_err(y, y_dense)
    t_dense = time_graph_ms([lambda: torch.nn.functional.linear(x, w)])
    t_sparse = time_graph_ms([lambda: semi_structured_linear(x, sparse)])
    t_eager = time_ms(lambda: semi_structured_linear(x, sparse))
    flops = 2 * m * n * k
    return {
        "M": m, "N x K": f"{n} x {k}", "dense ms": t_dense, "2:4 ms": t_sparse,
        "dense TFLOP/s": flops / t_dense / 1e9, "2:4 TFLOP/s (dense-equiv.)": flops / t_sparse / 1e9,
        "speed-up": t_dense / t_sparse, "2:4 / bf16 ceiling": flops / t_sparse / 1e9 / ceilings["bf16_tflops"],
        "2:4 eager ms": t_eager, "rel err": err, "backend": backend,
    }


def run(ceilings: dict) -> list:
    """Every (M, N x K) case; one dict per case (the table's columns). Needs a GPU with a 2:4 kernel."""
    backend, why = sparse_backend(SparseDevice.of("cuda"))
    if backend is None:
        raise SystemExit(f"bench_sparse: {why}")
    return [sparse_case(m, n, k, backend, ceilings) for m in TOKENS for n, k in LLAMA_7B]


if __name__ == "__main__":
    ceilings = measure_ceilings()
    print(header(ceilings), flush=True)
    print_table("2:4 semi-structured sparse linear vs dense bf16 linear (prefill)", COLUMNS, run(ceilings))
