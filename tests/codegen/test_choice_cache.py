"""First-use tuning choices kept on disk (`choice_cache.py`): a new process reads back what an earlier one chose on
the same GPU and software, and nothing else. The GPU is named by a stand-in here (CPU); `test_w4a16_direct.py` has the
same on a GPU, through the kernel's `choose`."""
import json

import pytest
import torch

from llmopt.codegen.kernels import choice_cache
from llmopt.codegen.kernels.choice_cache import MISSING, ChoiceCache

CHOICES = [(8, 1, False), (4, 2, True), None]
KEY = (torch.bfloat16, 1, 4096, 4096, 128)  # dtype, M bucket, N, K, G
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def kept(monkeypatch, tmp_path):
    """The cache's folder is tmp_path/llmopt, the GPU a named stand-in; returns a function making a cache over a
    kernel file whose source is given, as a new process would (nothing in memory)."""
    monkeypatch.setattr(choice_cache, "directory", lambda: tmp_path / "llmopt")
    monkeypatch.setattr(choice_cache, "describe_gpu", lambda device: "NVIDIA H200 sm_90 132 SMs, triton 3.6.0")
    source = tmp_path / "kernel.py"
    source.write_text("# kernel v1\n")

    def new_process(choices=CHOICES, code="# kernel v1\n"):
        source.write_text(code)
        return ChoiceCache("kernel", [source], choices)
    return new_process


@pytest.mark.parametrize("choice", CHOICES)
def test_a_new_process_reads_back_the_choice(kept, tmp_path, choice):
    assert kept().get(KEY, CUDA0) is MISSING
    assert kept().put(KEY, CUDA0, choice) == choice
    assert kept().get(KEY, CUDA0) == choice  # a tuple with a bool, or None (the other kernel won)
    files = list((tmp_path / "llmopt").glob("kernel-*.autotune.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == ["torch.bfloat16", "1", "4096", "4096", "128"]


def test_another_shape_gpu_source_or_candidate_list_tunes_again(kept, monkeypatch):
    kept().put(KEY, CUDA0, CHOICES[1])
    assert kept().get((torch.bfloat16, 1, 4096, 11008, 128), CUDA0) is MISSING  # another shape
    assert kept().get((torch.float16, 1, 4096, 4096, 128), CUDA0) is MISSING  # another dtype
    assert kept().get(KEY, torch.device("cuda", 1)) == CHOICES[1]  # another card of the same GPU
    assert kept(code="# kernel v2\n").get(KEY, CUDA0) is MISSING  # the kernel changed
    assert kept(choices=CHOICES + [(2, 1, False)]).get(KEY, CUDA0) is MISSING  # so did its candidates
    h100 = "NVIDIA H100 80GB HBM3 sm_90 132 SMs, triton 3.6.0"
    monkeypatch.setattr(choice_cache, "describe_gpu", lambda device: h100)
    assert kept().get(KEY, CUDA0) is MISSING  # another GPU


def test_a_damaged_or_foreign_file_is_ignored(kept, tmp_path):
    kept().put(KEY, CUDA0, CHOICES[0])
    (path, ) = (tmp_path / "llmopt").glob("*.autotune.json")
    path.write_text(json.dumps({"choice": [16, 16, False]}))  # not a candidate
    assert kept().get(KEY, CUDA0) is MISSING
    path.write_text('{"choice": [8, 1')  # cut short
    assert kept().get(KEY, CUDA0) is MISSING
    kept().put(KEY, CUDA0, CHOICES[1])  # tuning again replaces it
    assert kept().get(KEY, CUDA0) == CHOICES[1]


def test_a_folder_that_cannot_be_written_keeps_the_choice_in_this_process_only(kept, monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setattr(choice_cache, "directory", lambda: blocker / "llmopt")  # under a file: mkdir fails
    cache = kept()
    assert cache.put(KEY, CUDA0, CHOICES[0]) == CHOICES[0]  # no error
    assert cache.get(KEY, CUDA0) == CHOICES[0]
    assert kept().get(KEY, CUDA0) is MISSING
    assert list(tmp_path.glob("**/*.tmp")) == []


def test_the_default_folder_is_in_tritons_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert choice_cache.directory() == tmp_path / "llmopt"
