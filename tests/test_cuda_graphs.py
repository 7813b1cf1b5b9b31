"""runtime.cuda_graphs.GraphCache: eager off the GPU; on the H200, replays equal eager calls."""
import pytest
import torch

from llmopt.runtime.cuda_graphs import GraphCache


def _many_small_ops(x, y):  # x: [N, K], y: [N, K] or None
    out = x
    for _ in range(20):
        out = torch.sin(out) * 1.01 + (0 if y is None else y)
    return out


def test_off_the_gpu_every_call_is_fn():
    calls = []
    cache = GraphCache(lambda x, y: calls.append(1) or _many_small_ops(x, y))
    x = torch.randn(4, 8)
    for _ in range(3):
        torch.testing.assert_close(cache(x, None), _many_small_ops(x, None), rtol=0, atol=0)
    assert len(calls) == 3 and not cache.entries


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run with -m gpu on the H200")
def test_replays_match_eager_for_new_inputs_of_a_seen_shape():
    cache = GraphCache(_many_small_ops, max_entries=2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(5):  # calls 1 (eager), 2 (capture + timing), 3.. (graph or eager, whichever was faster)
        x, y = (torch.randn(64, 256, device="cuda", generator=gen) for _ in range(2))
        got = cache(x, y)
        torch.testing.assert_close(got, _many_small_ops(x, y), rtol=0, atol=0)
        assert got.data_ptr() != x.data_ptr()
    (entry,) = cache.entries.values()
    assert entry.calls == 5
    assert entry.graph_ms == entry.graph_ms and entry.eager_ms == entry.eager_ms  # both timed (not NaN)
    assert (entry.graph is not None) == (entry.graph_ms < entry.eager_ms)
    assert entry.graph is not None, cache.summary()  # 20 tiny launches: the graph wins
    for n in (32, 16, 8):  # more shapes than max_entries: the least recently used go
        cache(torch.randn(n, 256, device="cuda"), None)
    assert len(cache.entries) == 2


_FAILING_CAPTURE = """
import torch
from llmopt.runtime.cuda_graphs import GraphCache, GraphCaptureError
cache = GraphCache(lambda x: x * float(x.sum().item()))  # .item() synchronizes, which capture forbids
x = torch.randn(8, 8, device="cuda")
cache(x)
try:
    cache(x)
except GraphCaptureError as err:
    print("refused:", err)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run with -m gpu on the H200")
def test_a_capture_that_fails_names_the_fix():
    import subprocess
    import sys

    # in a child process: an aborted capture leaves torch's CUDA generator unusable in that process
    done = subprocess.run([sys.executable, "-c", _FAILING_CAPTURE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "cuda_graphs=False" in done.stdout, done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run with -m gpu on the H200")
def test_lowered_model_replays_equal_its_eager_calls():
    import transformers as tf

    import llmopt
    from llmopt.codegen import lower
    from llmopt.passes import FuseAttention
    from llmopt.testing import build_model

    config = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=2, vocab_size=512, max_position_embeddings=256)
    cm = llmopt.compile(build_model(config, dtype=torch.bfloat16).cuda(), passes=[FuseAttention()], backend="triton")
    eager = lower(cm.program, cuda_graphs=False)
    graphed = lower(cm.program)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def close(got, want):  # cuBLAS may pick another algorithm under capture: bf16 rounding, not bit equality
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        assert torch.isfinite(got).all() and rel < 1e-2, rel

    for _ in range(4):  # the same shape, new tokens every call
        ids = torch.randint(0, 512, (2, 64), device="cuda", generator=gen)  # ids: [B, T]
        close(graphed(ids), eager(ids))
        pos = torch.arange(64, device="cuda").expand(2, 64) + 3  # shifted positions: the general graph
        close(graphed(ids, pos), eager(ids, pos))
    assert len(graphed.graphs.entries) == 2 and all(e.calls == 4 for e in graphed.graphs.entries.values())
