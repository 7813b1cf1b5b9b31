"""All kernel benchmarks in one run: `python benchmarks/bench_kernels.py`.

Runs `bench_gemm` (W4A16 GEMV/GEMM, W8A8 GEMM vs torch bf16 matmul), `bench_attention` (prefill
FlashAttention vs SDPA, paged decode, residual+RMSNorm(+quant) vs eager) and `bench_sparse` (2:4
semi-structured linear vs dense bf16, prefill). Each measures the copy bandwidth and bf16 matmul
ceilings in the same process and prints its tables. (Not `kernels.py`: run as a script, that name would
shadow the PyPI package `kernels`, which transformers imports when it is installed.)
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    for module in ("benchmarks.bench_gemm", "benchmarks.bench_attention", "benchmarks.bench_sparse"):
        runpy.run_module(module, run_name="__main__")
