"""Micro-benchmark of the AWQ searches (`search_awq_scales` + `search_awq_clip`) on synthetic tensors.

Entry point: `python benchmarks/bench_awq_search.py [--model 7b|12m] [--tokens N] [--layers L]`.
For each decoder layer it runs AWQ's four scale groups (q/k/v on the attention input, o on the
attention output, gate/up on the MLP input, down on the MLP hidden state), each followed by the clip
search of every linear of the group on its scaled weight, the way the graph pass calls them, and
prints the wall time per group and in total (and the process CPU time, telling a busy shared
machine from a slow search). Runs on CUDA when available, else on CPU. Weights are
N(0, 0.02²); inputs are N(0, 1) with 1% of channels scaled by 20 (outlier channels, as in real LLMs).
Shapes: 7b = Llama-2-7B (hidden 4096, MLP 11008, 1 layer by default); 12m = the reference model
(hidden 384, MLP 1024, 6 layers, q/k/v outputs 384/128/128).
"""
import argparse
import time

import torch

from llmopt.passes.compress import search_awq_clip, search_awq_scales

SHAPES = {  # name: (hidden, mlp, kv_out, layers, tokens)
    "7b": (4096, 11008, 4096, 1, 128 * 512),
    "12m": (384, 1024, 128, 6, 128 * 256),
}


def layer_groups(hidden: int, mlp: int, kv_out: int):
    """-> [(group name, K, [N_i])]: the AWQ scale groups of one Llama decoder layer."""
    return [
        ("qkv", hidden, [hidden, kv_out, kv_out]),
        ("o", hidden, [hidden]),
        ("gate_up", hidden, [mlp, mlp]),
        ("down", mlp, [hidden]),
    ]


def synthetic_input(n: int, k: int, device) -> torch.Tensor:
    """-> [n, K] fp16 activations with 1% outlier channels."""
    g = torch.Generator(device="cpu").manual_seed(k)
    x = torch.randn(n, k, generator=g, dtype=torch.float16).to(device)
    x[:, torch.randperm(k, generator=g)[: max(1, k // 100)].to(device)] *= 20
    return x


def time_group(x, weights, bits: int, group_size: int, device) -> float:
    """Seconds for the scale search and the clip search of every weight in the group."""
    _sync(device)
    t0 = time.perf_counter()
    scales = search_awq_scales(x, weights, bits, group_size).scales
    x_scaled = x / scales.to(x.dtype)
    for w in weights:
        search_awq_clip(x_scaled, w * scales.to(w.dtype), bits, group_size)
    _sync(device)
    return time.perf_counter() - t0


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--tokens", type=int, help="calibration tokens (default 128 x seq len)")
    parser.add_argument("--layers", type=int, help="decoder layers to run")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    hidden, mlp, kv_out, layers, tokens = SHAPES[args.model]
    layers, tokens = args.layers or layers, args.tokens or tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    setup = f"{layers} layer(s), {tokens} tokens, w{args.bits} g{args.group_size}"
    print(f"AWQ search, {args.model} shapes, {setup}, {name}")
    total, cpu0 = 0.0, time.process_time()
    for layer in range(layers):
        for group, k, outs in layer_groups(hidden, mlp, kv_out):
            x = synthetic_input(tokens, k, device)
            weights = [(torch.randn(n, k, device=device) * 0.02).to(dtype) for n in outs]
            seconds = time_group(x, weights, args.bits, args.group_size, device)
            total += seconds
            print(f"layer {layer} {group:8s} K={k:5d} N={'+'.join(map(str, outs)):17s} {seconds:7.2f} s")
    print(f"total {total:.2f} s wall, {time.process_time() - cpu0:.2f} s process CPU time (setup included)")


if __name__ == "__main__":
    main()
