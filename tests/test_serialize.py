"""llmopt.save / llmopt.load: bit-identical round trips, the saved format, and every load error."""
import json
from pathlib import Path

import pytest
import sympy
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

import llmopt
from llmopt.passes import AWQ, RTN, W8A8, MergeLoRA, Smooth, SmoothQuant, Wanda
from llmopt.serialize import FORMAT_VERSION, MANIFEST, WEIGHTS
from llmopt.testing import build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INPUTS = [(1, 1), (2, 7), (3, 16)]  # [B, T] shapes: decode-like, odd, and the calibration length


def tiny_llama(tie: bool) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=tie,
                         bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return build_model(config, seed=1)


@pytest.fixture(scope="module")
def untied():
    """The capture of tiny_llama(tie=False), once a module: tests compile copies of it (what
    llmopt.compile(tiny_llama(tie=False)) would capture again, seconds each on CPU)."""
    return llmopt.capture(tiny_llama(tie=False))


def calibration(vocab=96) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def smoothed():
    return llmopt.compile(tiny_llama(tie=True), passes=[MergeLoRA(), Smooth(alpha=0.5)], calibration=calibration(), backend="torch")


@pytest.fixture
def saved(smoothed, tmp_path) -> Path:
    smoothed.save(tmp_path / "model")
    return tmp_path / "model"


def assert_same_logits(a, b, vocab=96):
    gen = torch.Generator().manual_seed(3)
    for shape in INPUTS:
        ids = torch.randint(0, vocab, shape, generator=gen)
        assert torch.equal(a(ids), b(ids)), f"logits differ for input shape {shape}"


def assert_same_program(a, b):
    """Same nodes, ops and arguments, same weights bit for bit, same shapes up to renaming the input symbols."""
    nodes_a, nodes_b = list(a.graph.nodes), list(b.graph.nodes)
    assert [(n.op, n.name, n.target) for n in nodes_a] == [(n.op, n.name, n.target) for n in nodes_b]
    assert [str(n.args) + str(n.kwargs) for n in nodes_a] == [str(n.args) + str(n.kwargs) for n in nodes_b]
    rename = {}
    for pa, pb in zip(a.nodes("placeholder"), b.nodes("placeholder")):
        rename.update({sa: sb for sa, sb in zip(a.shape(pa), b.shape(pb)) if isinstance(sa, sympy.Expr)})
    assert len(rename) == 2  # batch and tokens, dynamic
    for na, nb in zip(nodes_a, nodes_b):
        if isinstance(na.meta.get("val"), torch.Tensor):
            renamed = tuple(sympy.sympify(d).xreplace(rename) for d in a.shape(na))
            assert renamed == tuple(sympy.sympify(d) for d in b.shape(nb)), na.name
            assert a.dtype(na) == b.dtype(nb), na.name
    wa, wb = a.weights(), b.weights()
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and torch.equal(wa[name], wb[name]), name
    for key in ("weight_name", "sparsity"):
        assert [n.meta.get(key) for n in nodes_a] == [n.meta.get(key) for n in nodes_b]


def test_exact_passes_round_trip_bit_identical(smoothed, saved):
    loaded = llmopt.load(saved)
    assert_same_logits(smoothed, loaded)
    assert_same_program(smoothed.program, loaded.program)
    assert loaded.program.recipe == smoothed.program.recipe == [{"pass": "MergeLoRA", "options": {}}, {"pass": "Smooth", "options": {"alpha": 0.5}}]
    assert loaded.program.config == json.loads(json.dumps(smoothed.program.config))
    assert loaded.program.max_seq_len == smoothed.program.max_seq_len == 64
    assert loaded.report() == smoothed.report()


LOSSY = {
    "rtn_w4": lambda: [RTN(bits=4, group_size=32)],
    "awq_w4": lambda: [AWQ(bits=4, group_size=32, grid=4, tune_steps=4)],  # learned rounding, few steps
    "awq_w3": lambda: [AWQ(bits=3, group_size=32, grid=4, tune_steps=4)],  # learned rounding, few steps
    "w8a8_per_token": lambda: [W8A8()],
    "smoothquant_static": lambda: [SmoothQuant(alpha=0.5, activations="per_tensor_static")],
    "wanda_2_4_then_awq": lambda: [Wanda(sparsity=0.5, pattern="2:4"), AWQ(bits=4, group_size=32, grid=4, tune_steps=4)],
}


@pytest.mark.parametrize("recipe", LOSSY)
def test_lossy_passes_round_trip_bit_identical(recipe, untied, tmp_path):
    cm = llmopt.compile(untied.copy(), passes=LOSSY[recipe](), calibration=calibration(), backend="torch")
    quantized = {lin.kind for lin in cm.program.linears()} - {"dense"}
    assert len(quantized) == 1  # the recipe did rewrite linears into an llmopt op
    cm.save(tmp_path)
    loaded = llmopt.load(tmp_path)
    assert_same_logits(cm, loaded)
    assert_same_program(cm.program, loaded.program)
    assert loaded.program.recipe == json.loads(json.dumps(cm.program.recipe))
    for lin in loaded.program.linears():
        if lin.kind == "wq":  # packed: two int4/int3 values a byte, [N, K // 2] uint8
            packed = loaded.program.get_weight(lin.weight)
            assert packed.dtype == torch.uint8 and 2 * packed.shape[1] == loaded.program.shape(lin.input)[-1]


def test_manifest_and_tied_weights_stored_once(smoothed, saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["version"] == FORMAT_VERSION
    weights = smoothed.program.weights()
    (alias, name), = manifest["weights"]["aliases"].items()  # the tied embedding / lm head, once
    assert alias.endswith("_tied1") and weights[alias] is weights[name]
    stored = load_file(str(saved / WEIGHTS))
    assert set(stored) == set(weights) - {alias}
    linear = next(n for n in manifest["graph"] if n["target"] == "aten.linear.default")
    assert linear["args"][0] == {"node": linear["args"][0]["node"]} and linear["op"] == "call_function"
    loaded = llmopt.load(saved).program
    assert loaded.get_weight(alias) is loaded.get_weight(name)


def test_program_saves_and_loads_for_more_passes(untied, tmp_path):
    """A loaded Program is a full Program: passes run on it as on the captured one."""
    merged = llmopt.compile(untied.copy(), passes=[MergeLoRA()], backend="torch")
    llmopt.save(merged.program, tmp_path)
    resumed = llmopt.compile(llmopt.load(tmp_path).program, passes=[Smooth(alpha=0.5)], calibration=calibration())
    direct = llmopt.compile(untied.copy(), passes=[MergeLoRA(), Smooth(alpha=0.5)], calibration=calibration())
    assert_same_logits(direct, resumed)
    assert resumed.program.recipe == direct.program.recipe


def test_reference_model_round_trip(reference_model, tmp_path):
    cm = llmopt.compile(reference_model[1].copy(), backend="torch")  # the session's capture (tests/conftest.py)
    cm.save(tmp_path)
    assert_same_logits(cm, llmopt.load(tmp_path), vocab=4096)


# ---- errors ----------------------------------------------------------------------------------------
def test_directory_without_manifest(saved):
    (saved / MANIFEST).unlink()
    with pytest.raises(llmopt.LlmoptError, match=f"{saved}.*has no llmopt.json.*llmopt.save"):
        llmopt.load(saved)
    with pytest.raises(llmopt.LlmoptError, match="does not exist"):
        llmopt.load(saved / "nowhere")


def edit_manifest(saved: Path, edit):
    manifest = json.loads((saved / MANIFEST).read_text())
    edit(manifest)
    (saved / MANIFEST).write_text(json.dumps(manifest))


def test_newer_format_version(saved):
    edit_manifest(saved, lambda m: m.update(version=FORMAT_VERSION + 1))
    with pytest.raises(llmopt.LlmoptError, match=f"{MANIFEST}.*version {FORMAT_VERSION + 1}.*upgrade llmopt"):
        llmopt.load(saved)


@pytest.mark.parametrize("version", ["1", 0, None])
def test_unknown_format_version(saved, version):
    edit_manifest(saved, lambda m: m.update(version=version))
    with pytest.raises(llmopt.LlmoptError, match="unknown format version"):
        llmopt.load(saved)


def test_truncated_weights(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(llmopt.LlmoptError, match=f"{WEIGHTS} is corrupt or truncated"):
        llmopt.load(saved)


def test_flipped_byte_in_weights(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data: safetensors alone would not notice
    (saved / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(llmopt.LlmoptError, match="sha256 differs"):
        llmopt.load(saved)


def test_unreadable_safetensors_with_matching_checksum(saved):
    (saved / WEIGHTS).write_bytes(b"not a safetensors file")
    import hashlib

    edit_manifest(saved, lambda m: m["weights"].update(sha256=hashlib.sha256(b"not a safetensors file").hexdigest()))
    with pytest.raises(llmopt.LlmoptError, match="not a readable safetensors file"):
        llmopt.load(saved)


def test_missing_weights_file(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(llmopt.LlmoptError, match="is missing"):
        llmopt.load(saved)


def test_malformed_json(saved):
    text = (saved / MANIFEST).read_text()
    (saved / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(llmopt.LlmoptError, match="not valid JSON"):
        llmopt.load(saved)


def test_manifest_missing_a_field(saved):
    edit_manifest(saved, lambda m: m.pop("graph"))
    with pytest.raises(llmopt.LlmoptError, match="malformed.*KeyError.*graph"):
        llmopt.load(saved)


def test_dangling_node_reference(saved):
    def dangle(m):
        linear = next(n for n in m["graph"] if n["target"] == "aten.linear.default")
        linear["args"][0] = {"node": "no_such_node"}

    edit_manifest(saved, dangle)
    with pytest.raises(llmopt.LlmoptError, match="reads node 'no_such_node'"):
        llmopt.load(saved)


@pytest.mark.parametrize("target", ["llmopt.no_such_op.default", "aten.linear.no_such_overload", "_operator.no_such_function", "linear"])
def test_unknown_op(saved, target):
    def rename(m):
        next(n for n in m["graph"] if n["target"] == "aten.linear.default")["target"] = target

    edit_manifest(saved, rename)
    with pytest.raises(llmopt.LlmoptError, match=f"calls '{target}', an op this llmopt does not know"):
        llmopt.load(saved)


def test_save_refuses_what_it_cannot_name(smoothed, tmp_path):
    program = smoothed.program.copy()
    node = next(n for n in program.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.silu.default)
    node.target = lambda x: x  # a Python function outside operator/math/torch
    with pytest.raises(llmopt.LlmoptError, match=f"node {node.name} calls .*cannot name"):
        llmopt.save(program, tmp_path)
    assert not (tmp_path / MANIFEST).exists() and not (tmp_path / WEIGHTS).exists()


def test_save_refuses_options_json_cannot_hold(smoothed, tmp_path):
    program = smoothed.program.copy()
    program.recipe.append({"pass": "Custom", "options": {"scale": torch.ones(2)}})
    with pytest.raises(llmopt.LlmoptError, match="JSON cannot store"):
        llmopt.save(program, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_to_a_file_is_refused_by_name(smoothed, tmp_path):
    taken = tmp_path / "model.bin"
    taken.write_bytes(b"the user's bytes")
    with pytest.raises(llmopt.LlmoptError, match=rf"llmopt.save: {taken} is a file; give a directory"):
        smoothed.save(taken)
    assert taken.read_bytes() == b"the user's bytes"


def test_save_over_an_earlier_save(saved, untied):
    other = llmopt.compile(untied.copy(), backend="torch")
    (saved / "tokenizer.json").write_text("{}")  # files llmopt did not write stay
    other.save(saved)
    assert_same_logits(other, llmopt.load(saved))
    assert (saved / "tokenizer.json").read_text() == "{}"


# ---- command line ----------------------------------------------------------------------------------
def test_cli_compile_then_generate(reference_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    from llmopt.cli import main
    from llmopt.data import calibration_batches

    model_dir, text = SHARED / "models" / "ref-llama-12m", SHARED / "data" / "tinyshakespeare" / "input.txt"
    out = tmp_path / "compiled"
    assert main(["compile", str(model_dir), "--passes", "mergelora", "smooth:alpha=0.5", "--calibration", str(text),
                 "--samples", "4", "--seq-len", "64", "--out", str(out)]) == 0
    assert (out / MANIFEST).is_file()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The king said", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out.strip()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = calibration_batches(text, tokenizer, n_samples=4, seq_len=64)
    # the session's capture of the same model directory (tests/conftest.py), as the command captured it
    cm = llmopt.compile(reference_model[1].copy(), passes=[MergeLoRA(), Smooth(alpha=0.5)], calibration=calib, backend="torch")
    ids = torch.tensor([tokenizer("The king said")["input_ids"]])
    expected = tokenizer.decode(cm.generate(ids, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id)[0], skip_special_tokens=True)
    assert printed == expected and printed.startswith("The king said") and len(printed) > len("The king said")
