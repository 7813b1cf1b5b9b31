"""Quality of llmopt's compression passes: WikiText-2 perplexity of the reference model, as is and with
injected activation outliers, for every recipe; plus the target checks and AWQ's compression time.

Entry point: `python benchmarks/quality.py [--max-windows N] [--device cpu|cuda] [--out FILE]`.

Protocol: the reference model (../shared/models/ref-llama-12m, fp32) and the same model after
`llmopt.testing.inject_outliers(channels=6, factor=30)` (function-preserving) are compiled with each
recipe through `llmopt.compile(program, passes=[...], calibration=...)`; calibration is 128 random
windows of 256 tokens (the training window) from brown, us-speeches and tinyshakespeare, never the
test set; perplexity is `llmopt.evaluate.perplexity` over non-overlapping 256-token windows of the
whole WikiText-2 test set (1475 windows; `--max-windows` for quick runs).

Rows are measured one at a time and, with `--resume FILE`, appended to FILE as JSON lines (with the
commit they were measured at); a rerun with the same FILE and settings skips the rows already there
(the full table takes about 25 min on an idle 2-core CPU, hours when the CPU is shared).
The markdown (date, command, hardware, table, target checks) goes at the end of the section of `--out`
whose heading starts `## Quality` (benchmarks/RESULTS.md by default; the section is created if missing).
"""
import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import llmopt
from llmopt.passes import AWQ, RTN, W8A8, MagnitudePrune, SmoothQuant, Wanda

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CALIBRATION_FILES = ("brown/brown.txt", "us-speeches/speeches.txt", "tinyshakespeare/input.txt")
TEST_FILE = "wikitext-2/test.txt"
WINDOW = 256
OUTLIERS = {"channels": 6, "factor": 30.0}

RECIPES = {  # row label -> the pass list
    "FP32": lambda: [],
    "W8A8 naive (per-tensor static act.)": lambda: [W8A8(activations="per_tensor_static")],
    "SmoothQuant W8A8 (α 0.5, per-tensor static act.)": lambda: [SmoothQuant(alpha=0.5, activations="per_tensor_static")],
    "RTN w4g128": lambda: [RTN(bits=4, group_size=128)],
    "AWQ w4g128": lambda: [AWQ(bits=4, group_size=128)],  # the default: learned rounding
    "AWQ w4g128, round to nearest": lambda: [AWQ(bits=4, group_size=128, rounding="nearest")],  # the paper's
    "AWQ w4g128, GPTQ rounding": lambda: [AWQ(bits=4, group_size=128, rounding="gptq")],
    "RTN w3g128": lambda: [RTN(bits=3, group_size=128)],
    "AWQ w3g128": lambda: [AWQ(bits=3, group_size=128)],
    "AWQ w3g128, round to nearest": lambda: [AWQ(bits=3, group_size=128, rounding="nearest")],
    "AWQ w3g128, GPTQ rounding": lambda: [AWQ(bits=3, group_size=128, rounding="gptq")],
    "AWQ w4g128, round to nearest, v→o under GQA": lambda: [AWQ(bits=4, group_size=128, rounding="nearest", gqa_vo=True)],
    "AWQ w3g128, round to nearest, v→o under GQA": lambda: [AWQ(bits=3, group_size=128, rounding="nearest", gqa_vo=True)],
    "magnitude 50%": lambda: [MagnitudePrune(sparsity=0.5)],
    "Wanda 50%": lambda: [Wanda(sparsity=0.5)],
    "magnitude 2:4": lambda: [MagnitudePrune(sparsity=0.5, pattern="2:4")],
    "Wanda 2:4": lambda: [Wanda(sparsity=0.5, pattern="2:4")],
    "Wanda 2:4 + AWQ w4g128": lambda: [Wanda(sparsity=0.5, pattern="2:4"), AWQ(bits=4, group_size=128)],
}
MODELS = ("reference", "outliers")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=SHARED / "models" / "ref-llama-12m")
    p.add_argument("--data", type=Path, default=SHARED / "data", help="folder holding wikitext-2/, brown/, us-speeches/, tinyshakespeare/")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N test windows only (quick runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=WINDOW, help="calibration window length")
    p.add_argument("--rows", nargs="*", default=list(RECIPES), help="row labels to measure (default: all)")
    p.add_argument("--resume", type=Path, default=None, help="JSON-lines file of measured rows: read, skip, append")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    return p.parse_args(argv)


def load_inputs(args):
    """The fp32 model's Programs (as is, with outliers), calibration windows [n, seq_len], test tokens [n]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmopt.data import calibration_from_files, tokenize_file
    from llmopt.testing import inject_outliers

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    reference = llmopt.capture(model).to(args.device)
    programs = {"reference": reference, "outliers": inject_outliers(reference, **OUTLIERS)}
    calibration = calibration_from_files([args.data / f for f in CALIBRATION_FILES], tokenizer, n_samples=args.samples, seq_len=args.seq_len)
    tokens = tokenize_file(args.data / TEST_FILE, tokenizer)
    return programs, calibration, tokens


def measure(program, recipe: str, calibration, tokens, args) -> dict:
    """Compile a copy of `program` with the recipe's passes and measure its test perplexity."""
    from llmopt.evaluate import perplexity

    start = time.perf_counter()
    cm = llmopt.compile(program.copy(), passes=RECIPES[recipe](), calibration=calibration, backend="torch")
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    result = perplexity(cm, tokens, window=WINDOW, batch_size=args.batch_size, max_windows=args.max_windows, device=args.device, progress=False)
    return {
        "ppl": result.ppl, "n_windows": result.n_windows, "compile_s": compile_s, "eval_s": time.perf_counter() - start,
        "pass_s": {r.name: r.seconds for r in cm.pass_records},
        "bytes": cm.program.parameter_bytes(),
    }


def settings_key(args) -> dict:
    """What a measured row depends on besides its model and recipe (a resumed row must match it)."""
    return {"max_windows": args.max_windows, "device": args.device, "samples": args.samples, "seq_len": args.seq_len, "model": str(args.model)}


def awq_seconds(program, calibration, repeats: int = 3) -> float:
    """AWQ w4g128's pass time: the fastest of `repeats` runs (the CPU may be shared with other work)."""
    times = []
    for _ in range(repeats):
        cm = llmopt.compile(program.copy(), passes=RECIPES["AWQ w4g128"](), calibration=calibration, backend="torch")
        times.append(cm.pass_records[0].seconds)
    return min(times)


def run_rows(args, inputs, version: str) -> dict:
    """{(model, recipe): row}: read from --resume, then measured for what is missing."""
    key = settings_key(args)
    rows = {}
    if args.resume is not None and args.resume.exists():
        for line in args.resume.read_text().splitlines():
            row = json.loads(line)
            if row["settings"] == key:
                rows[(row["model"], row["recipe"])] = row
    programs, calibration, tokens = inputs
    for model, recipe in [(m, r) for r in args.rows for m in MODELS if (m, r) not in rows]:
        row = {"model": model, "recipe": recipe, "settings": key, "version": version, **measure(programs[model], recipe, calibration, tokens, args)}
        print(f"{model:<9} {recipe:<48} ppl {row['ppl']:8.3f}  compile {row['compile_s']:7.1f} s  eval {row['eval_s']:7.1f} s", flush=True)
        rows[(model, recipe)] = row
        if args.resume is not None:
            with open(args.resume, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def table(rows: dict, args) -> str:
    fp32 = {m: rows[(m, "FP32")]["ppl"] for m in MODELS if (m, "FP32") in rows}
    lines = [
        "| recipe | ppl | × FP32 | ppl, outliers | × FP32, outliers | MB of weights | compile s (ref / outl.) | eval s (ref / outl.) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for recipe in [r for r in RECIPES if r in args.rows]:
        cells = []
        for m in MODELS:
            row = rows.get((m, recipe))
            cells += [f"{row['ppl']:.3f}", f"{row['ppl'] / fp32[m]:.4f}"] if row and m in fp32 else ["-", "-"]
        rs = [rows.get((m, recipe)) for m in MODELS]
        size = f"{rs[0]['bytes'] / 1e6:.1f}" if rs[0] else "-"
        times = [" / ".join(f"{r[key]:.1f}" if r else "-" for r in rs) for key in ("compile_s", "eval_s")]
        lines.append(f"| {recipe} | " + " | ".join(cells + [size] + times) + " |")
    return "\n".join(lines)


def target_checks(rows: dict) -> list:
    """(PASS|FAIL|INFO, description) for each quality target whose rows were measured (INFO: no target)."""
    def ppl(m, r):
        return rows[(m, r)]["ppl"] if (m, r) in rows else None

    checks = []
    for m in MODELS:
        fp, sq = ppl(m, "FP32"), ppl(m, "SmoothQuant W8A8 (α 0.5, per-tensor static act.)")
        if fp and sq:
            checks.append((sq <= 1.01 * fp, f"SmoothQuant W8A8 ≤ 1.01 × FP32 ({m}): {sq:.3f} vs {1.01 * fp:.3f} ({sq / fp:.4f}×)"))
    for m in MODELS:
        for bits in (4, 3):
            fp, rtn, awq = ppl(m, "FP32"), ppl(m, f"RTN w{bits}g128"), ppl(m, f"AWQ w{bits}g128")
            if fp and rtn and awq:
                closed = (rtn - awq) / (rtn - fp) if rtn != fp else float("nan")
                checks.append((closed >= 0.6, f"AWQ closes ≥ 60% of RTN's gap at w{bits}g128 ({m}): {closed:.0%} (RTN {rtn:.3f}, AWQ {awq:.3f}, FP32 {fp:.3f})"))
            for option in ("round to nearest", "GPTQ rounding", "round to nearest, v→o under GQA"):  # other roundings: reported, not targets
                other = ppl(m, f"AWQ w{bits}g128, {option}")
                if fp and rtn and other and rtn != fp:
                    checks.append((None, f"AWQ with {option} closes {(rtn - other) / (rtn - fp):.0%} of RTN's gap at w{bits}g128 ({m}): {other:.3f}"))
    for pattern in ("50%", "2:4"):
        wanda, magnitude = ppl("outliers", f"Wanda {pattern}"), ppl("outliers", f"magnitude {pattern}")
        if wanda and magnitude:
            checks.append((wanda < magnitude, f"Wanda < magnitude at {pattern} (outliers): {wanda:.3f} vs {magnitude:.3f}"))
    return [("INFO" if ok is None else "PASS" if ok else "FAIL", text) for ok, text in checks]


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def code_version() -> str:
    """The commit measured, with '-dirty' when the working tree differs from it."""
    import subprocess

    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def report(rows: dict, args, awq_s: float) -> str:
    n_windows = {r["n_windows"] for r in rows.values()}
    row_s = sum(r["compile_s"] + r["eval_s"] for r in rows.values())
    versions = sorted({r["version"] for r in rows.values()})
    lines = [
        f"### {datetime.date.today()}: ref-llama-12m, WikiText-2 test, {'/'.join(map(str, sorted(n_windows)))} windows of {WINDOW}",
        "",
        f"`python benchmarks/quality.py {shlex.join(sys.argv[1:])}` at {', '.join(versions)} on {hardware(args.device)}; "
        f"the {len(rows)} rows took {row_s / 60:.0f} min (compile + eval). Calibration: {args.samples} × {args.seq_len} tokens from "
        f"{', '.join(f.split('/')[0] for f in CALIBRATION_FILES)}. Outliers: `inject_outliers(channels={OUTLIERS['channels']}, factor={OUTLIERS['factor']:g})`. "
        "Seconds are wall time and grow when other jobs share the CPU: an unloaded full-set evaluation takes about the FP32 row's time.",
        "",
        table(rows, args),
        "",
    ]
    lines += [f"- {verdict}: {text}" for verdict, text in target_checks(rows)]
    if awq_s is not None:
        lines.append(f"- AWQ w4g128 compression time on the reference model: {awq_s:.1f} s on {args.device} "
                     f"(the pass alone, {args.samples} × {args.seq_len} calibration tokens; fastest of 3 runs)")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str):
    """Put `text` at the end of the file's quality section (its heading starts `## Quality`; appended if missing)."""
    content = path.read_text() if path.exists() else "# llmopt benchmark results\n"
    start = content.find("\n## Quality")
    if start < 0:
        path.write_text(content.rstrip("\n") + "\n\n## Quality\n\n" + text)
        return
    end = content.find("\n## ", start + 1)
    end = len(content) if end < 0 else end + 1
    path.write_text(content[:start].rstrip("\n") + "\n" + content[start:end].rstrip("\n") + "\n\n" + text + ("\n" + content[end:] if end < len(content) else ""))


def main(argv=None):
    args = parse_args(argv)
    unknown = [r for r in args.rows if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(RECIPES)}")
    args.rows = ["FP32"] + [r for r in args.rows if r != "FP32"]  # every ratio needs the FP32 row
    torch.manual_seed(0)
    version = code_version()  # the code as it was when the rows were measured
    inputs = load_inputs(args)
    rows = run_rows(args, inputs, version)
    awq_s = awq_seconds(inputs[0]["reference"], inputs[1]) if "AWQ w4g128" in args.rows else None
    text = report(rows, args, awq_s)
    print(text)
    write_section(args.out, text)
    print(f"written to the Quality section of {args.out}")


if __name__ == "__main__":
    main()
