"""What each `llmopt` subcommand does (argument parsing is in `llmopt.cli`).

Entry points: `demo`, `inspect`, `compile`, `generate`, `eval`, each taking the parsed arguments.
"""
import collections
import os

import torch

from llmopt.devices import checked_device
from llmopt.errors import LlmoptError


def demo(args):
    """Build a small Llama from a config (random weights, no network), compile it with the exact
    passes, print the pass report and a few generated tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmopt
    from llmopt.passes import ConstantFolding, DeadCodeElimination, MergeLoRA, Smooth

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    calibration = torch.randint(0, config.vocab_size, (8, 64))
    print("llmopt demo: a 2-layer Llama (hidden 128, GQA 4/2 heads) built from a config, random weights")
    cm = llmopt.compile(model, passes=[MergeLoRA(), Smooth(alpha=0.5), ConstantFolding(), DeadCodeElimination()],
                        calibration=calibration, debug=True)
    print(cm.report())
    prompt = torch.randint(0, config.vocab_size, (1, 8))
    out = cm.generate(prompt, max_new_tokens=8)
    reference = model.generate(prompt, max_new_tokens=8, do_sample=False)
    print(f"\nprompt tokens:    {prompt[0].tolist()}")
    print(f"generated tokens: {out[0, 8:].tolist()}")
    print(f"same as transformers' greedy generate: {torch.equal(out, reference)}")


def inspect(args):
    import llmopt

    model, _ = load_model(args.model_dir)
    program = llmopt.capture(model)
    ops = collections.Counter(_op_kind(n) for n in program.graph.nodes if n.op == "call_function")
    dtypes = collections.Counter(str(t.dtype).removeprefix("torch.") for t in program.weights().values())
    params = sum(t.numel() for t in program.weights().values())
    print(f"model: {args.model_dir} ({model.config.model_type}, {getattr(model.config, 'num_hidden_layers', '?')} layers)")
    print(f"graph: {len(program.graph.nodes)} nodes; dynamic dims batch and tokens (max {program.max_seq_len})")
    print(f"roles: {len(program.linears())} linears, {len(program.norms())} norms, {len(program.attentions())} attentions, "
          f"{len(program.embeddings())} embeddings, lm head: {program.lm_head().name if program.lm_head() else 'none'}")
    print(f"parameters: {params / 1e6:.2f} M ({program.parameter_bytes() / 1e6:.1f} MB), dtypes: {dict(dtypes)}")
    print("ops by kind: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))


def compile(args):
    import llmopt
    from llmopt.recipe import parse_passes

    passes = parse_passes(args.passes)  # before the model loads: a typo is reported at once
    for flag, path in (("--out", args.out), ("--dump-kernels", args.dump_kernels)):
        if path and os.path.exists(path) and not os.path.isdir(path):  # found now, not after minutes of passes
            raise LlmoptError(f"{flag} {path} is a file; give a directory (it is created if missing)")
    model, tokenizer = load_model(args.model_dir)
    calibration = _calibration(args, tokenizer)
    cm = llmopt.compile(model, passes=passes, calibration=calibration, backend="torch")
    print(cm.report())
    cm.save(args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)  # so `llmopt generate OUT` and `llmopt eval OUT` work on their own
    print(f"saved to {args.out}")
    if args.dump_kernels:
        from llmopt.codegen import dump_kernels  # the lowered graph's kernels (W8A8 quantization fused into norms)

        paths = dump_kernels(cm.program, args.dump_kernels)
        print(f"wrote {len(paths)} generated kernels to {args.dump_kernels}")


def generate(args):
    import llmopt
    from llmopt.recipe import parse_passes

    if _is_llmopt_dir(args.model_dir):
        cm = llmopt.load(args.model_dir)
        tokenizer = _tokenizer(args.model_dir)
    else:
        passes = parse_passes(args.passes)
        model, tokenizer = load_model(args.model_dir)
        cm = llmopt.compile(model, passes=passes, backend="torch")
    if tokenizer is None:
        raise LlmoptError(f"{args.model_dir} has no tokenizer: save one beside the model (tokenizer.save_pretrained)")
    ids = torch.tensor([tokenizer(args.prompt)["input_ids"]])
    out = cm.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


def eval(args):
    import llmopt
    from llmopt.data import tokenize_file
    from llmopt.evaluate import perplexity
    from llmopt.recipe import parse_passes

    device = checked_device(args.device, "--device") if args.device else None  # before a model loads (minutes at 7B)
    if _is_llmopt_dir(args.model_dir):
        if args.passes or args.calibration:
            raise LlmoptError(f"{args.model_dir} is an already compiled model: --passes/--calibration apply to a model "
                              "directory; compile again from the original model instead")
        cm, tokenizer = llmopt.load(args.model_dir, device=device), _tokenizer(args.model_dir)
    else:
        passes = parse_passes(args.passes)
        model, tokenizer = load_model(args.model_dir)
        if device is not None:
            model = model.to(device)
        cm = llmopt.compile(model, passes=passes, calibration=_calibration(args, tokenizer), backend="torch")
    tokens = tokenize_file(args.data, tokenizer)
    result = perplexity(cm, tokens, window=args.window, max_windows=args.max_windows, device=cm.program.device)
    print(f"perplexity {result.ppl:.3f} over {result.n_windows} windows of {args.window} tokens ({result.n_tokens} scored)")


def load_model(model_dir):
    """A transformers causal LM (fp32) and its tokenizer (or None) from a local directory."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(model_dir):
        raise LlmoptError(f"{model_dir} is not a directory: give a local model directory (config.json + weights)")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise LlmoptError(f"{model_dir} has no config.json: is it a transformers model directory?")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, _tokenizer(model_dir)


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    has_tokenizer = any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(model_dir) if has_tokenizer else None


def _calibration(args, tokenizer):
    if not getattr(args, "calibration", None):
        return None
    from llmopt.data import calibration_batches

    if tokenizer is None:
        raise LlmoptError("--calibration needs the model's tokenizer beside its weights")
    return calibration_batches(args.calibration, tokenizer, n_samples=args.samples, seq_len=args.seq_len)


def _is_llmopt_dir(path) -> bool:
    return os.path.exists(os.path.join(path, "llmopt.json"))


def _op_kind(node) -> str:
    return str(node.target).removeprefix("aten.").split(".")[0]
