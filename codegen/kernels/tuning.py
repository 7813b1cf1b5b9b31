"""The autotuning timer the templates share.

Entry points: `quick_bench`, passed as `triton.autotune(..., do_bench=quick_bench)`: short, since tuning
runs once per shape and GPU, on the first call; and `streaming_bench(make_call, weight_bytes, device)`, for the
kernels whose weights a model streams from memory (a layer's weights are not in L2 when it runs): it times calls
over enough copies of the weights that none is in L2 when its turn comes, as a CUDA graph (GPU time only),
built by `capture_graph(calls)`, which the benchmarks' `time_graph_ms` uses too.

Every llmopt autotuner also passes `cache_results=True`: Triton keeps each choice on disk, in its cache
directory (TRITON_CACHE_DIR), keyed by the kernel's source, the GPU target, the tuning key and the
configs, so a new process reuses it instead of timing the configs again (`benchmarks/warm_start.py`
measures what that saves). The kernels llmopt tunes itself (the Gluon W4A16 kernels, the TMA W8A8 GEMM, whose
descriptors' block shapes follow the config) keep their choices beside those, through `choice_cache.py`.
"""
import torch
import triton.testing


def quick_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def capture_graph(calls: list) -> torch.cuda.CUDAGraph:
    """calls (closures) -> one CUDA graph of them, after one eager run of each: compilation, autotuning and what
    the calls allocate and keep between them happen outside the capture."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def streaming_bench(make_call, weight_bytes: int, device: torch.device) -> float:
    """make_call(i) -> a call on the i-th copy of the weights (weight_bytes each) -> ms a call: one call on each of
    enough copies to fill twice the L2 cache (16 at most), captured in one CUDA graph and timed as its replays, so
    the host's cost of launching a call (which can exceed a small kernel's time: H100, session 18) stays out."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    calls = [make_call(i) for i in range(max(1, min(16, -(-2 * l2 // weight_bytes))))]
    with torch.cuda.device(device):
        return quick_bench(capture_graph(calls).replay, None) / len(calls)
