"""First-call latency of a compiled model in a new process, with and without Triton's on-disk caches.

Entry point: `python benchmarks/warm_start.py [--layers 2] [--tokens 2048] [--cases bf16,W8A8,W4A16]` (a CUDA
GPU). The Llama-2-7B shape of `benchmarks/e2e.py` (random weights, bf16, `--layers` of its 32 layers) is
compiled for the Triton backend (bf16, SmoothQuant W8A8, RTN w4g128), then each case runs in three fresh processes
sharing one new TRITON_CACHE_DIR:
- "cold": nothing cached, every kernel is compiled and every autotuned kernel tunes its configs;
- "tuning not cached": the compiled kernels are on disk, the autotuners' results (`*.autotune.json`)
  deleted: what every new process paid before llmopt's autotuners set `cache_results=True`;
- "warm": both on disk.
Each process times (wall clock, synchronized) the first prefill of `--tokens` tokens, then the first
`generate` of 32 tokens after a 128-token prompt, then both again (steady state). Prints one table.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import print_table  # noqa: E402

CASES = ("bf16", "W8A8", "W4A16")


def child(case: str, layers: int, tokens: int) -> dict:
    import torch

    import llmopt
    import llmopt.passes as P
    from benchmarks.e2e import build_llama_7b_shape

    model = build_llama_7b_shape(layers)
    passes = {"bf16": [], "W8A8": [P.SmoothQuant(alpha=0.5)], "W4A16": [P.RTN(bits=4, group_size=128)]}[case]
    calib = torch.randint(0, 32000, (4, 256), device="cuda") if case == "W8A8" else None
    cm = llmopt.compile(model, passes=[*passes, P.FuseAttention()], calibration=calib, backend="triton")
    ids = torch.randint(0, 32000, (1, tokens), device="cuda")
    prompt = ids[:, :128]

    def seconds(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    prefill = lambda: cm(ids)  # noqa: E731
    generate = lambda: cm.generate(prompt, max_new_tokens=32)  # noqa: E731
    return {"first prefill s": seconds(prefill), "first generate s": seconds(generate),
            "prefill s, again": seconds(prefill), "generate s, again": seconds(generate)}


def run_child(case: str, args, cache_dir: str) -> dict:
    env = {**os.environ, "TRITON_CACHE_DIR": cache_dir}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--layers", str(args.layers), "--tokens", str(args.tokens)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{case}: the child process failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--cases", type=lambda text: text.split(","), default=list(CASES),
                        help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--child", choices=CASES)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.tokens)), flush=True)
        return
    rows = []
    for case in args.cases:
        with tempfile.TemporaryDirectory() as cache_dir:
            for state in ("cold", "tuning not cached", "warm"):
                if state == "tuning not cached":
                    for path in glob.glob(os.path.join(cache_dir, "**", "*.autotune.json"), recursive=True):
                        os.remove(path)
                row = {"case": case, "caches": state, **run_child(case, args, cache_dir)}
                print(row, flush=True)
                rows.append(row)
    print_table(f"First calls in a new process, Llama-2-7B shape ({args.layers} of 32 layers), prefill {args.tokens} tokens, "
                "generate 32 after 128", ["case", "caches", "first prefill s", "first generate s", "prefill s, again",
                                         "generate s, again"], rows)


if __name__ == "__main__":
    main()
