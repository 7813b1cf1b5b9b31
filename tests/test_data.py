"""Tokenizing files and drawing calibration windows."""
from pathlib import Path

import pytest
import torch

from llmopt.data import calibration_batches, calibration_from_files, tokenize_file

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "models" / "ref-llama-12m")


def test_tokenize_file_is_the_plain_token_stream(tmp_path, tokenizer):
    path = tmp_path / "a.txt"
    path.write_text("The cat sat.\nThe dog ran.\n", encoding="utf-8")
    tokens = tokenize_file(path, tokenizer)  # [n]
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokenizer.decode(tokens.tolist()) == path.read_text()  # no BOS/EOS added, nothing lost


def test_windows_are_deterministic_distinct_slices():
    tokens = torch.arange(10_000)  # each window is a run of consecutive integers
    batches = calibration_batches(tokens, n_samples=16, seq_len=64, seed=1)  # [16, 64]
    assert batches.shape == (16, 64) and batches.dtype == torch.long
    assert torch.equal(batches, calibration_batches(tokens, n_samples=16, seq_len=64, seed=1))
    assert not torch.equal(batches, calibration_batches(tokens, n_samples=16, seq_len=64, seed=2))
    assert (batches.diff(dim=1) == 1).all()  # contiguous slices of the stream
    assert batches.flatten().unique().numel() == batches.numel()  # no overlap


def test_short_text_gives_fewer_windows_with_a_warning():
    with pytest.warns(UserWarning, match="holds only 3"):
        batches = calibration_batches(torch.arange(200), n_samples=8, seq_len=64)
    assert batches.shape == (3, 64)
    with pytest.raises(ValueError, match="too short for one window"):
        calibration_batches(torch.arange(50), n_samples=8, seq_len=64)
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_batches("some/file.txt")


@pytest.mark.parametrize("n_samples, seq_len", [(8, 0), (0, 64), (-1, 64)])
def test_no_window_asked_for_is_refused(n_samples, seq_len):
    with pytest.raises(ValueError, match=rf"n_samples={n_samples} and seq_len={seq_len} must both be at least 1"):
        calibration_batches(torch.arange(1000), n_samples=n_samples, seq_len=seq_len)


def test_windows_from_several_files_stay_inside_one_file(tmp_path, tokenizer):
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    paths[0].write_text("cat " * 300, encoding="utf-8")
    paths[1].write_text("dog " * 300, encoding="utf-8")  # no letter in common with "cat"
    batches = calibration_from_files(paths, tokenizer, n_samples=8, seq_len=32, seed=0)  # [8, 32]
    letters = [set(tokenizer.decode(window)) - {" "} for window in batches.tolist()]
    assert all(found == set("cat") or found == set("dog") for found in letters)
    assert {"c", "d"} <= set.union(*letters)  # both files contribute (seed 0)
