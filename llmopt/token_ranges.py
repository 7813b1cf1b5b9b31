"""Range checks on the integer tensors users hand llmopt: token ids against the vocabulary, positions against the
context, made before the ids reach an embedding (where an id outside it fails deep inside; on a GPU as a
device-side assert that ends the process's CUDA context).

Entry points: `first_outside(t, stop) -> int | None`: a value of t outside [0, stop) (the lowest if one is below 0,
else the highest), or None; `vocabulary_problem(ids, vocab, what) -> str`: '' when every id lies in the vocabulary,
else the message that names one outside it and the fix, for the caller's own error class.
"""
import torch


def first_outside(t: torch.Tensor, stop: int):
    low, high = (int(v) for v in torch.aminmax(t))  # one pass, one host sync
    if low < 0:
        return low
    return high if high >= stop else None


def vocabulary_problem(ids: torch.Tensor, vocab: int, what: str) -> str:
    """what: the tensor's name in the message ('input_ids', 'calibration')."""
    bad = first_outside(ids, vocab)
    if bad is None:
        return ""
    return (f"{what} holds token id {bad}, outside the model's vocabulary of {vocab} (ids 0 to {vocab - 1}): "
            "tokenize it with the model's own tokenizer")
