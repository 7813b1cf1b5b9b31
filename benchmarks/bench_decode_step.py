"""One-token steps of a lowered model on the GPU, replayed from CUDA graphs: W4A16 against bf16, and programmatic
dependent launch (PDL) on and off, and W4A16 and W8A8 with their sibling linears merged (q/k/v, gate/up: one linear
each, `codegen/concat_linears.py`) or apart, in the same run.

Entry point: `python benchmarks/bench_decode_step.py [--layers 8] [--batch 1,16]`. A Llama-2-7B-shaped model (random
weights, bf16, `--layers` of its 32 layers) is lowered for the GPU as bf16 (FuseAttention), RTN w4g128 (weight-only
int4, the format AWQ also produces) and SmoothQuant W8A8 (alpha 0.5, per-token activations), the quantized two with
their sibling linears merged and apart. For each B of `--batch`, each runs a step of B sequences
of one token, with no KV cache: llmopt's lowered program recomputes its input, so a one-token input is the decode
step's linears, norms and pointwise kernels, every linear at M = B. The step is captured in one CUDA graph and timed
as its replays (events, warm-up, median), as a serving runtime replays decode steps. PDL (`codegen/kernels/pdl.py`)
lets each kernel start while the one before it finishes; `LLMOPT_PDL=0` turns it off at capture. The lm_head
(32000 x 4096, bf16 in every model) is part of every step.
Prints a table of µs a step, the speed-up over bf16, PDL's gain and the merge's gain (apart / merged).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import header, measure_ceilings, print_table, time_graph_ms  # noqa: E402
from benchmarks.e2e import build_llama_7b_shape  # noqa: E402


def step_us(lowered, ids: torch.Tensor, pdl: bool) -> float:
    """µs a step of `lowered` on ids [B, 1], captured with PDL on or off."""
    saved = os.environ.get("LLMOPT_PDL")
    os.environ["LLMOPT_PDL"] = "1" if pdl else "0"
    try:
        with torch.no_grad():
            return 1e3 * time_graph_ms([lambda: lowered(ids)])
    finally:
        if saved is None:
            os.environ.pop("LLMOPT_PDL")
        else:
            os.environ["LLMOPT_PDL"] = saved


def run(args) -> list:
    import llmopt
    import llmopt.passes as P
    from llmopt.codegen import lower

    model = build_llama_7b_shape(args.layers)
    bf16 = lower(llmopt.compile(model, passes=[P.FuseAttention()], backend="triton").program, cuda_graphs=False)
    calibration = torch.randint(0, 32000, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    models = {"bf16": bf16}
    for name, recipe in (("W4A16", P.RTN(bits=4, group_size=128)), ("W8A8", P.SmoothQuant(alpha=0.5))):
        program = llmopt.compile(model, passes=[recipe, P.FuseAttention()], calibration=calibration,
                                 backend="torch").program
        models[name] = lower(program, cuda_graphs=False)
        models[f"{name} siblings apart"] = lower(program, cuda_graphs=False, concat_linears=False)  # q/k/v, gate/up
    rows = []
    for batch in args.batch:
        ids = torch.randint(0, 32000, (batch, 1), device="cuda")  # ids: [B, 1]
        with torch.no_grad():
            want = bf16(ids).float().flatten()
            for name in ("W4A16", "W8A8"):
                agreement = torch.nn.functional.cosine_similarity(want, models[name](ids).float().flatten(), 0)
                print(f"batch {batch}: {name} vs bf16 logits, cosine similarity {agreement.item():.4f}", flush=True)
        times = {(name, pdl): step_us(lowered, ids, pdl) for name, lowered in models.items() for pdl in (False, True)}
        for (name, pdl), us in times.items():
            apart = times.get((f"{name} siblings apart", pdl))
            rows.append({"batch": batch, "model": f"llmopt {name}", "PDL": "on" if pdl else "off", "µs a step": us,
                         "speed-up vs bf16 without PDL": times["bf16", False] / us,
                         "PDL gain": times[name, False] / us if pdl else "",
                         "merge gain": apart / us if apart else ""})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=lambda text: [int(v) for v in text.split(",")], default=[1, 16],
                        help="sequences a step, e.g. 1,16")
    args = parser.parse_args()
    ceilings = measure_ceilings()
    print(header(ceilings))
    rows = run(args)
    print_table(f"One-token step, Llama-2-7B shape ({args.layers} of 32 layers), CUDA graph replays",
                ["batch", "model", "PDL", "µs a step", "speed-up vs bf16 without PDL", "PDL gain", "merge gain"], rows)


if __name__ == "__main__":
    main()
