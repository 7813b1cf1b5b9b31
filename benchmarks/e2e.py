"""End-to-end prefill on the GPU: llmopt against transformers, same model, same run.

Entry point: `python benchmarks/e2e.py [--layers 8] [--tokens 2048]`. A Llama-2-7B-shaped model
(hidden 4096, MLP 11008, 32 heads, vocab 32000; random weights, bf16, built on the GPU; `--layers`
of its 32 layers, since every layer is the same work) runs a prefill of `--tokens` tokens:
- transformers eager with SDPA attention (the baseline users would otherwise pick),
- llmopt backend="torch" (the captured ATen graph on PyTorch ops),
- llmopt backend="triton" with FuseAttention (bf16),
- llmopt SmoothQuant W8A8 with backend="triton" (when the W8A8 passes are installed),
- llmopt RTN w4g128 (weight-only int4, what AWQ also produces) with backend="triton",
each triton case also with `cuda_graphs=False` (every kernel launched from Python on every call),
since the lowered programs replay a repeated shape from a CUDA graph when that measures faster.
Prints a table of milliseconds, tokens/s and speed-up over transformers.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import header, measure_ceilings, print_table, time_ms  # noqa: E402


def build_llama_7b_shape(layers: int, kv_heads: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=kv_heads,
                         num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def run(args) -> list:
    import llmopt
    import llmopt.passes as P
    from llmopt.codegen import lower

    model = build_llama_7b_shape(args.layers)
    ids = torch.randint(0, 32000, (1, args.tokens), device="cuda")
    rows = []

    def case(name, fn):
        try:
            with torch.no_grad():
                ms = time_ms(fn)
        except Exception as err:  # one failing case must not hide the others' numbers
            print(f"{name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
            return
        rows.append({"case": name, "ms": ms, "tokens/s": args.tokens / ms * 1e3})
        print(f"{name}: {ms:.2f} ms", flush=True)

    case("transformers eager + SDPA (bf16)", lambda: model(input_ids=ids, use_cache=False).logits)
    cm_torch = llmopt.compile(model, passes=[], backend="torch")
    case("llmopt backend=torch (bf16)", lambda: cm_torch(ids))
    del cm_torch
    cm_triton = llmopt.compile(model, passes=[P.FuseAttention()], backend="triton")
    case("llmopt backend=triton (bf16)", lambda: cm_triton(ids))
    no_graphs = lower(cm_triton.program, cuda_graphs=False)
    case("llmopt backend=triton (bf16), no CUDA graphs", lambda: no_graphs(ids))
    templates_only = lower(cm_triton.program, fuse=False)
    case("llmopt triton templates only, no generated fusion (bf16)", lambda: templates_only(ids))
    del cm_triton, templates_only, no_graphs
    if hasattr(P, "SmoothQuant"):
        calib = torch.randint(0, 32000, (8, 512), device="cuda")
        cm_w8 = llmopt.compile(model, passes=[P.SmoothQuant(alpha=0.5), P.FuseAttention()], calibration=calib, backend="triton")
        case("llmopt SmoothQuant W8A8 backend=triton", lambda: cm_w8(ids))
        w8_no_graphs = lower(cm_w8.program, cuda_graphs=False)
        case("llmopt SmoothQuant W8A8 backend=triton, no CUDA graphs", lambda: w8_no_graphs(ids))
        del cm_w8, w8_no_graphs
    cm_w4 = llmopt.compile(model, passes=[P.RTN(bits=4, group_size=128), P.FuseAttention()], backend="triton")
    case("llmopt RTN w4g128 (W4A16) backend=triton", lambda: cm_w4(ids))
    del cm_w4
    base = rows[0]["ms"]
    bf16 = next((r["ms"] for r in rows if r["case"] == "llmopt backend=triton (bf16)"), float("nan"))
    for r in rows:
        r["speed-up vs transformers"] = base / r["ms"]
        r["speed-up vs llmopt triton bf16"] = bf16 / r["ms"]
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    ceilings = measure_ceilings()
    print(header(ceilings))
    rows = run(args)
    print_table(f"Prefill of {args.tokens} tokens, Llama-2-7B shape ({args.layers} of 32 layers), batch 1",
                ["case", "ms", "tokens/s", "speed-up vs transformers", "speed-up vs llmopt triton bf16"], rows)


if __name__ == "__main__":
    main()
