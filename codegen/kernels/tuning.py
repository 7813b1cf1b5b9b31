"""The autotuning timer the templates share.

Entry point: `quick_bench`, passed as `triton.autotune(..., do_bench=quick_bench)`: short, since tuning
runs once per shape and GPU, on the first call.

Every llmopt autotuner also passes `cache_results=True`: Triton keeps each choice on disk, in its cache
directory (TRITON_CACHE_DIR), keyed by the kernel's source, the GPU target, the tuning key and the
configs, so a new process reuses it instead of timing the configs again (`benchmarks/warm_start.py`
measures what that saves). Triton cannot keep the choice of a kernel whose configs have pre-hooks (the
TMA W8A8 GEMM's): that one still tunes once per process.
"""
import triton.testing


def quick_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
