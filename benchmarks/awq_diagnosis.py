"""Where RTN's perplexity gap comes from on the reference model, and how much AWQ's scale search can do.

Entry point: `python benchmarks/awq_diagnosis.py [--bits 4 3] [--max-windows 300]`.

1. Per linear type (q, k, v, o, gate, up, down): the WikiText-2 perplexity with only that type's
   weights round-to-nearest quantized (group 128, asymmetric: `fake_quantize_groups`, what `RTN`
   stores), the rest fp32; and with every type quantized. The gaps add up to about the whole one, so
   this says which layers a method must fix.
2. AWQ's scale search on each input group of the reference model (through the AWQ pass, calibration as
   in benchmarks/quality.py): the output error of the best scale against plain RTN (s = 1) on the
   search's own objective. A ratio near 1 means that no per-channel scale helps those linears: their
   inputs have no salient channels for AWQ to protect.
Perplexity is `llmopt.evaluate.perplexity` over the first `--max-windows` 256-token windows of the
WikiText-2 test set.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.quality import CALIBRATION_FILES, SHARED, TEST_FILE, WINDOW  # noqa: E402

LINEAR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_gaps(model, tokens, bits: int, max_windows: int) -> list:
    """[(label, ppl, ppl - fp32)] with one linear type quantized at a time, then all of them."""
    from llmopt.evaluate import perplexity
    from llmopt.passes.compress.rtn import fake_quantize_groups

    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    def ppl_with(types) -> float:
        with torch.no_grad():
            for name, p in model.named_parameters():
                quantize = name.endswith("weight") and any(f".{t}." in name for t in types)
                p.copy_(fake_quantize_groups(original[name], bits, 128) if quantize else original[name])
        return perplexity(lambda ids: model(ids).logits, tokens, window=WINDOW, batch_size=16,
                          max_windows=max_windows, progress=False).ppl

    fp32 = ppl_with(())
    rows = [(t, ppl_with((t,))) for t in LINEAR_TYPES] + [("all", ppl_with(LINEAR_TYPES))]
    ppl_with(())  # leave the model as it was
    return [("fp32", fp32, 0.0)] + [(label, p, p - fp32) for label, p in rows]


def scale_search_gains(program, calibration, bits: int) -> list:
    """[(linears, alpha, duo, best error / RTN error)] for every group AWQ searched, in graph order (the pass's stats)."""
    from llmopt.passes import AWQ

    stats = AWQ(bits=bits, group_size=128)(program.copy(), calibration).stats
    return list(zip(stats["groups"], stats["alphas"], stats["duo"], stats["error_vs_rtn"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--max-windows", type=int, default=300)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmopt
    from llmopt.data import calibration_from_files, tokenize_file

    path = SHARED / "models" / "ref-llama-12m"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = tokenize_file(SHARED / "data" / TEST_FILE, tokenizer)
    calibration = calibration_from_files([SHARED / "data" / f for f in CALIBRATION_FILES], tokenizer, n_samples=128, seq_len=WINDOW)
    program = llmopt.capture(model)
    for bits in args.bits:
        print(f"### RTN w{bits}g128, one linear type at a time (ref-llama-12m, first {args.max_windows} WikiText-2 windows)\n")
        print("| quantized | ppl | gap to fp32 | share of the whole gap |\n| --- | ---: | ---: | ---: |")
        rows = rtn_gaps(model, tokens, bits, args.max_windows)
        whole = rows[-1][2]
        for label, ppl, gap in rows:
            print(f"| {label} | {ppl:.3f} | {gap:+.3f} | {100 * gap / whole:.0f}% |")
        print(f"\n### AWQ w{bits}g128 scale search: best output error / RTN's, per input group (in graph order)\n")
        gains = scale_search_gains(program, calibration, bits)
        print("| linears | alpha | duo | error ratio |\n| --- | ---: | --- | ---: |")
        for names, alpha, duo, ratio in gains:
            print(f"| {names} | {alpha:.2f} | {duo} | {ratio:.3f} |")
        print(flush=True)


if __name__ == "__main__":
    main()
