"""The autotuning timer the templates share.

Entry point: `quick_bench`, passed as `triton.autotune(..., do_bench=quick_bench)`: short, since tuning
runs once per shape and GPU, on the first call.
"""
import triton.testing


def quick_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
