"""PassManager: report, verification after each pass, debug equivalence, refusals before any change, a pass out of
device memory; `llmopt.compile` argument errors."""
import pytest
import torch
from transformers import LlamaConfig

import llmopt
from llmopt import Pass, PassManager, PassResult
from llmopt.calibration import Calibration
from llmopt.passes import AWQ, RTN, W8A8, ConstantFolding, DeadCodeElimination, MergeLoRA, Smooth, SmoothQuant, Wanda
from llmopt.testing import build_model

CALIBRATION = Calibration([torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))], progress=False)


@pytest.fixture(scope="module")
def captured():
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False,
    )
    return llmopt.capture(build_model(config, seed=3))


@pytest.fixture
def program(captured):
    return captured.copy()


def snapshot(program) -> dict:
    return {name: tensor.clone() for name, tensor in program.weights().items()}


def assert_unchanged(program, weights, node_count):
    assert not program.recipe and len(program.graph.nodes) == node_count
    assert program.weights().keys() == weights.keys()
    assert all(torch.equal(program.get_weight(name), tensor) for name, tensor in weights.items())


class ScaleLmHead(Pass):
    """Claims to be exact but doubles the logits."""

    exact = True

    def apply(self, program, calibration):
        head = program.lm_head()
        program.set_weight(head.weight, program.get_weight(head.weight) * 2)
        return PassResult(program, True, {"scaled": 1})


class Lossy(ScaleLmHead):
    exact = False


def python_function(x):
    return x + 1


class InsertPythonCall(Pass):
    """Leaves a node that calls a plain Python function: not a valid Program."""

    def apply(self, program, calibration):
        head = program.lm_head().node
        with program.graph.inserting_after(head):
            bad = program.graph.call_function(python_function, (head,))
        head.replace_all_uses_with(bad)
        bad.args = (head,)
        program.gm.recompile()
        return PassResult(program, True)


class NeedsMergeLoRA(Pass):
    requires = ("MergeLoRA",)

    def apply(self, program, calibration):
        return PassResult(program, False)


def test_report_has_time_and_stats_per_pass_in_order(program):
    manager = PassManager([ConstantFolding(), Smooth(0.5), DeadCodeElimination()])
    out = manager.run(program, CALIBRATION)
    assert [r.name for r in manager.report] == ["ConstantFolding", "Smooth", "DeadCodeElimination"]
    assert all(isinstance(r.seconds, float) and r.seconds > 0 for r in manager.report)
    assert manager.report[0].stats == {"nodes_folded": 1}  # RoPE's device move of inv_freq
    assert manager.report[1].stats == {"norms_smoothed": 2, "linears_smoothed": 5} and manager.report[1].changed
    assert manager.report[2].stats == {"nodes_removed": 0} and not manager.report[2].changed
    assert [step["pass"] for step in out.recipe] == ["ConstantFolding", "Smooth", "DeadCodeElimination"]
    assert out.recipe[1]["options"] == {"alpha": 0.5}


def test_verify_runs_after_each_pass(program):
    manager = PassManager([ConstantFolding(), InsertPythonCall(), DeadCodeElimination()])
    with pytest.raises(llmopt.VerifyError, match=r"node python_function calls .*python_function"):
        manager.run(program)
    assert [r.name for r in manager.report] == ["ConstantFolding"]  # stopped at the broken pass


def test_debug_names_the_first_pass_that_breaks_equivalence(program):
    manager = PassManager([ConstantFolding(), ScaleLmHead(), Smooth(0.5), ScaleLmHead()], debug=True)
    head = program.lm_head().node.name
    with pytest.raises(llmopt.EquivalenceError, match=rf"exact pass ScaleLmHead changed .*first diverging node: {head}"):
        manager.run(program, CALIBRATION)
    assert [r.name for r in manager.report] == ["ConstantFolding"]


def test_debug_checks_exact_passes_only(program):
    reference = program.copy()
    manager = PassManager([Lossy(), Smooth(0.5)], debug=True)
    out = manager.run(program, CALIBRATION)
    input_ids = torch.arange(10).view(2, 5)
    torch.testing.assert_close(out.run(input_ids), reference.run(input_ids) * 2, rtol=1e-4, atol=1e-4)


def test_without_debug_a_broken_exact_pass_goes_unnoticed(program):
    manager = PassManager([ScaleLmHead()])
    manager.run(program)
    assert manager.report[0].stats == {"scaled": 1}


def refusal(program, passes, calibration, message):
    weights, nodes = snapshot(program), len(program.graph.nodes)
    manager = PassManager(passes)
    with pytest.raises(llmopt.PassError, match=message):
        manager.run(program, calibration)
    assert manager.report == []
    assert_unchanged(program, weights, nodes)


def test_refuses_a_missing_calibration_before_any_change(program):
    refusal(program, [ConstantFolding(), Smooth(0.5)], None, r"Smooth needs calibration data: pass calibration=")


def test_refuses_a_required_pass_that_comes_later(program):
    refusal(program, [ConstantFolding(), NeedsMergeLoRA(), MergeLoRA()], None,
            r"NeedsMergeLoRA needs MergeLoRA to run before it: move MergeLoRA before NeedsMergeLoRA")


def test_refuses_a_required_pass_that_is_absent(program):
    refusal(program, [ConstantFolding(), NeedsMergeLoRA()], None, r"add MergeLoRA\(\.\.\.\) before NeedsMergeLoRA")


def test_refuses_a_once_only_pass_twice(program):
    refusal(program, [Smooth(0.5), ConstantFolding(), Smooth(0.8)], CALIBRATION, r"Smooth appears twice")


def test_refuses_a_once_only_pass_already_applied(program):
    Smooth(0.5)(program, CALIBRATION)
    with pytest.raises(llmopt.PassError, match=r"Smooth appears twice \(or was already applied\)"):
        PassManager([Smooth(0.5)]).run(program, CALIBRATION)


@pytest.mark.parametrize("quantizer, float_pass", [
    (W8A8(), Smooth(0.5)), (RTN(4, 32), Wanda(0.5)), (SmoothQuant(0.5), AWQ(4, 32)), (AWQ(4, 32), W8A8()),
    (RTN(4, 32), MergeLoRA()),
])
def test_refuses_a_float_linear_pass_after_a_quantizer_before_any_change(program, quantizer, float_pass):
    refusal(program, [ConstantFolding(), quantizer, float_pass], CALIBRATION,
            rf"{float_pass.name} needs float linears, but {quantizer.name}, earlier in the pass list, quantized them: "
            rf"apply {float_pass.name} to the float model, before any quantization pass")


def test_refuses_a_float_linear_pass_on_a_quantized_program(program):
    RTN(4, 32)(program)
    with pytest.raises(llmopt.PassError, match=r"Smooth needs float linears, but the passes already applied \(RTN\) "
                                               r"quantized them"):
        PassManager([Smooth(0.5)]).run(program, CALIBRATION)
    with pytest.raises(llmopt.PassError, match=r"Wanda needs float linears, but the passes already applied \(RTN\)"):
        Wanda(0.5)(program, CALIBRATION)  # a pass called on its own checks the same


def test_pruning_and_smoothing_before_a_quantizer_are_accepted(program):
    out = PassManager([Wanda(0.5), Smooth(0.5), RTN(4, 32)]).run(program, CALIBRATION)
    assert [step["pass"] for step in out.recipe] == ["Wanda", "Smooth", "RTN"]
    assert {lin.kind for lin in out.linears() if lin.node is not out.lm_head().node} == {"wq"}


def test_refuses_calibration_ids_outside_the_vocabulary_before_any_change(program):
    bad = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    bad[1, 3] = 50
    refusal(program, [ConstantFolding(), Smooth(0.5)], bad,
            r"calibration holds token id 50, outside the model's vocabulary of 50 \(ids 0 to 49\): tokenize it")


def test_refuses_calibration_longer_than_the_context_before_any_change(program):
    refusal(program, [ConstantFolding(), Smooth(0.5)], torch.zeros(1, 65, dtype=torch.long),
            r"calibration sequences of 65 tokens exceed the model's context of 64: cut them to at most 64")


class RunsOutOfMemory(Pass):
    def apply(self, program, calibration):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB\n(details)")


def test_a_pass_out_of_device_memory_is_named_with_the_fix(program):
    with pytest.raises(llmopt.DeviceMemoryError, match=r"RunsOutOfMemory ran out of cpu memory \(CUDA out of memory. "
                                                       r"Tried to allocate 12.00 GiB\): calibrate in smaller batches"):
        PassManager([ConstantFolding(), RunsOutOfMemory()]).run(program)


def test_refuses_a_pass_class_instead_of_an_instance(program):
    refusal(program, [ConstantFolding(), Smooth], CALIBRATION, r"pass #1 is .*Smooth.*not an llmopt Pass: build it")


def test_compile_refuses_an_unknown_backend(program):
    with pytest.raises(llmopt.LlmoptError, match=r"unknown backend 'tensorrt': choose one of auto, torch, triton"):
        llmopt.compile(program, backend="tensorrt")


def test_compile_refuses_triton_for_a_cpu_program(program, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it for kernel tests
    weights, nodes = snapshot(program), len(program.graph.nodes)
    with pytest.raises(llmopt.LlmoptError, match=r"backend='triton' needs the model on a CUDA GPU"):
        llmopt.compile(program, passes=[Smooth(0.5)], calibration=CALIBRATION, backend="triton")
    assert_unchanged(program, weights, nodes)  # refused before the passes ran


def test_compile_runs_passes_and_reports(program):
    input_ids = torch.arange(12).view(2, 6)
    expected = program.run(input_ids)
    cm = llmopt.compile(program, passes=[Smooth(0.5), DeadCodeElimination()], calibration=CALIBRATION.batches[0], backend="torch")
    report = cm.report()
    assert "| Smooth |" in report and "norms_smoothed=2, linears_smoothed=5" in report and "| DeadCodeElimination |" in report
    torch.testing.assert_close(cm(input_ids), expected, rtol=1e-4, atol=1e-4)
