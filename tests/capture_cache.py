"""One torch.export a model for the whole CPU suite: `llmopt.capture` remembers what it captured, by what determines
the graph and the weights, and gives a copy when the same model comes again.

Entry point: `install()` (tests/conftest.py calls it once a session). Captures are about half the suite's time, and
the suite builds the same tiny models many times over: `build_model(config, seed)` is deterministic, and
hypothesis' first example of a config strategy is the same in every test that draws one. A model is remembered only
when it is a plain transformers model without hooks, and is recognized by its class, its module tree, every config
attribute (the private ones, such as the attention implementation, included), and a digest of every weight and
buffer; a capture with `example_inputs` is never remembered. A repeated capture returns `Program.copy()` of the
first one's result, kept aside untouched: its own graph and cloned weights, as a fresh capture would give (which
would share the model's weight storage instead). Errors are not remembered: a model that fails, fails every time.
"""
import hashlib
import sys

import torch

import llmopt

_FIRST_CAPTURES = {}


def install():
    """Make `llmopt.capture` (and `llmopt.capture.capture`, which compile() calls) remember its captures."""
    module = sys.modules["llmopt.capture"]
    capture = module.capture

    def remembering_capture(model, example_inputs=None):
        key = _model_key(model) if example_inputs is None else None
        if key is None:
            return capture(model, example_inputs)
        if key not in _FIRST_CAPTURES:
            program = capture(model)
            _FIRST_CAPTURES[key] = program.copy()
            return program
        return _FIRST_CAPTURES[key].copy()

    remembering_capture.__doc__ = capture.__doc__
    module.capture = llmopt.capture = remembering_capture


def _model_key(model):
    """What the capture of `model` depends on, or None when that cannot be told from the model alone."""
    if not isinstance(model, torch.nn.Module) or not type(model).__module__.startswith("transformers."):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=False).items():
        if tensor.device.type == "meta":
            return None
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)} {tensor.device}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    config = sorted((k, repr(v)) for k, v in vars(model.config).items()) if hasattr(model, "config") else []
    return type(model).__qualname__, repr(model), repr(config), digest.hexdigest()
