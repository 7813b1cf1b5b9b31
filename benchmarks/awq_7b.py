"""AWQ compression time on the GPU for a Llama-2-7B-shaped model (random weights, built on the GPU).

Entry point: `python benchmarks/awq_7b.py [--layers 32] [--samples 128] [--seq-len 512] [--clip-sweeps N] [--rounding nearest|gptq|learned]
[--kv-heads 8 [--gqa-vo]]`.
Prints the wall time of `llmopt.compile(model, passes=[AWQ(bits=4, group_size=128)], calibration)`
and the peak GPU memory; with learned rounding also how many stages the tuning kept, and the logits' relative
error against the bf16 model on 4 × 512 random held-out tokens, beside plain RTN's.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.e2e import build_llama_7b_shape  # noqa: E402


def main():
    import llmopt
    from llmopt.passes import AWQ, RTN
    from llmopt.passes.awq import ROUNDINGS

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--clip-sweeps", type=int, default=AWQ().clip_sweeps, help="AWQ's clip_sweeps (default: the pass's)")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=AWQ().rounding, help="AWQ's rounding (default: the pass's)")
    parser.add_argument("--kv-heads", type=int, default=32, help="KV heads (32: Llama-2-7B; 8: the same shape under GQA)")
    parser.add_argument("--gqa-vo", action="store_true", help="AWQ(gqa_vo=True): search v→o under GQA too")
    args = parser.parse_args()
    model = build_llama_7b_shape(args.layers, args.kv_heads)
    calibration = torch.randint(0, 32000, (args.samples, args.seq_len), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cm = llmopt.compile(model, passes=[AWQ(bits=4, group_size=128, clip_sweeps=args.clip_sweeps, rounding=args.rounding, gqa_vo=args.gqa_vo)], calibration=calibration, backend="torch")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    stats = cm.pass_records[0].stats
    if "stages_tuned" in stats:
        held_out = torch.randint(0, 32000, (4, args.seq_len), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        with torch.no_grad():
            exact = model(held_out).logits.float()
            rtn = llmopt.compile(model, passes=[RTN(bits=4, group_size=128)], backend="torch")(held_out).float()
            err = lambda logits: float((logits - exact).norm() / exact.norm())  # noqa: E731
            print(f"learned rounding: {stats['stages_tuned']} of {len(stats['tune_loss_ratio'])} stages tuned, "
                  f"{stats['stages_not_tunable']} not tunable; logits rel. error {err(cm(held_out).float()):.4f} (RTN {err(rtn):.4f})")
    print(f"AWQ w4g128 (clip_sweeps={args.clip_sweeps}, rounding={args.rounding}, gqa_vo={args.gqa_vo}), Llama-2-7B shape ({args.layers} of 32 layers, "
          f"{args.kv_heads} KV heads), {args.samples}x{args.seq_len} calibration tokens, "
          f"{torch.cuda.get_device_name()}: {seconds:.1f} s, peak GPU memory {peak:.1f} GiB; "
          f"weights {cm.program.parameter_bytes() / 2**30:.2f} GiB after")


if __name__ == "__main__":
    main()
