"""The `llmopt` command: demo, inspect, compile, generate, eval.

Entry point: `main(argv=None)`. Errors print as one line (`--debug` shows the traceback).
"""
import argparse
import sys

from llmopt.errors import LlmoptError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llmopt", description="A compiler for LLM inference.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("demo", help="compile a small Llama built from a config and generate (no network)")

    p = sub.add_parser("inspect", help="summary of a model's captured graph")
    p.add_argument("model_dir")

    p = sub.add_parser("compile", help="capture, run passes, save the compiled model")
    p.add_argument("model_dir")
    p.add_argument("--passes", nargs="*", default=[], help="e.g. mergelora smooth:alpha=0.5 awq:bits=4,group_size=128")
    p.add_argument("--calibration", help="text file for calibration batches (tokenized with the model's tokenizer)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    p.add_argument("--out", required=True, help="directory to write the compiled model to")
    p.add_argument("--dump-kernels", metavar="DIR", help="also write the generated Triton kernels there, one file a kernel")

    p = sub.add_parser("generate", help="generate text from a model or a compiled-model directory")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--passes", nargs="*", default=[])

    p = sub.add_parser("eval", help="perplexity over non-overlapping windows of a text file")
    p.add_argument("model_dir")
    p.add_argument("--data", required=True)
    p.add_argument("--passes", nargs="*", default=[])
    p.add_argument("--calibration", help="text file for calibration batches")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--device", default=None)

    args = parser.parse_args(argv)
    try:
        from llmopt import commands

        return getattr(commands, args.command)(args) or 0
    except (LlmoptError, FileNotFoundError, ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"llmopt {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
