"""A device this machine lacks is refused by name (`llmopt.devices`) where users name one or lowering needs one:
`llmopt.load(..., device=)`, `Program.to`, the CLI's `--device`, `lower`. CUDA is hidden or faked with monkeypatch,
so the tests mean the same on the CPU machine and on the GPU one."""
import pytest
import torch
from transformers import LlamaConfig

import llmopt
from llmopt.cli import main
from llmopt.devices import checked_device
from llmopt.testing import build_model


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    directory = tmp_path_factory.mktemp("saved")
    llmopt.compile(build_model(config, seed=0), backend="torch").save(directory)
    return directory


def test_load_on_cuda_without_a_gpu_is_refused_by_name(saved, no_cuda):
    with pytest.raises(llmopt.LlmoptError, match=r"llmopt.load: device 'cuda' asked for, but this machine has no CUDA "
                                                 r"GPU that torch can use .*use device='cpu'"):
        llmopt.load(saved, device="cuda")


def test_program_to_a_gpu_index_past_the_last_is_refused(saved, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    program = llmopt.load(saved).program
    with pytest.raises(llmopt.LlmoptError, match=r"Program.to: device 'cuda:2' asked for, but this machine has 2 CUDA "
                                                 r"GPU\(s\) \(cuda:0 to cuda:1\)"):
        program.to("cuda:2")
    assert program.device.type == "cpu"  # nothing moved


@pytest.mark.parametrize("device, message", [
    ("gpu", r"'gpu' is not a device; use 'cpu', 'cuda' or 'cuda:N'"),
    ("meta", r"the meta device holds no weights"),
])
def test_names_that_are_no_usable_device(device, message):
    with pytest.raises(llmopt.LlmoptError, match=message):
        checked_device(device, "test")


def test_cli_device_flag_is_checked_before_the_model_loads(shared, no_cuda, capsys):
    data = str(shared / "data" / "wikitext-2" / "test.txt")
    assert main(["eval", str(shared / "models" / "ref-llama-12m"), "--data", data, "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmopt eval: error: --device: device 'cuda' asked for, but this machine has no CUDA GPU")
    assert "\n" not in err


def test_lowering_a_cpu_program_without_the_interpreter_is_refused_by_name(saved, monkeypatch):
    from llmopt.codegen import lower

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it for kernel tests
    with pytest.raises(llmopt.LlmoptError, match=r"llmopt.codegen.lower needs the model on a CUDA GPU \(it is on cpu\): "
                                                 r"move it with model.to\('cuda'\)"):
        lower(llmopt.load(saved).program)
