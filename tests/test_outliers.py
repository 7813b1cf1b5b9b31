"""inject_outliers keeps the function and makes a few norm channels `factor` times larger."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.calibration import Calibration
from llmopt.producers import input_groups
from llmopt.testing import any_config, build_model, inject_outliers

FACTOR, CHANNELS = 30.0, 6


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|: fp32 rounding of ×F then ÷F over a few layers stays near 1e-6."""
    return ((a - b).abs().max() / a.abs().max()).item()


def norm_groups(program) -> list:
    return [g for g in input_groups(program) if g.kind == "norm"]


def assert_scaled_channels(before, after):
    """Each norm: exactly CHANNELS channels of weight + offset × FACTOR, its consumers' columns ÷ FACTOR."""
    for g_before, g_after in zip(norm_groups(before), norm_groups(after)):
        offset = g_before.norm.offset
        scale_before = before.get_weight(g_before.norm.weight) + offset  # [C]
        scale_after = after.get_weight(g_after.norm.weight) + offset
        picked = scale_after != scale_before
        assert int(picked.sum()) == CHANNELS, g_before.name
        torch.testing.assert_close(scale_after[picked], scale_before[picked] * FACTOR, rtol=1e-6, atol=1e-6)
        for c_before, c_after in zip(g_before.consumers, g_after.consumers):
            w_before, w_after = before.get_weight(c_before.weight), after.get_weight(c_after.weight)  # [N, K]
            torch.testing.assert_close(w_after[:, picked], w_before[:, picked] / FACTOR, rtol=1e-6, atol=0)
            assert torch.equal(w_after[:, ~picked], w_before[:, ~picked])


def absmax_ratios(program, ids) -> list:
    """max / median of the per-channel max |x| at each norm-fed linear input."""
    groups = norm_groups(program)
    stats = Calibration([ids], progress=False).statistics(program, [g.value for g in groups])
    return [(stats[g.value].absmax.max() / stats[g.value].absmax.median()).item() for g in groups]


@pytest.fixture(scope="module")
def reference(reference_model):
    return reference_model  # (model, its Program), captured once a session (tests/conftest.py)


def test_reference_model_function_kept_and_outliers_appear(reference):
    model, reference = reference
    injected = inject_outliers(model, channels=CHANNELS, factor=FACTOR)  # a transformers model is captured first
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    assert relative_error(reference(ids), injected(ids)) < 1e-5
    assert_scaled_channels(reference, injected)
    before, after = absmax_ratios(reference, ids), absmax_ratios(injected, ids)
    assert len(after) == 12  # 6 layers × (attention norm, MLP norm)
    assert max(before) < FACTOR / 2  # the trained model has no strong outliers of its own
    assert min(after) >= FACTOR / 2


def test_program_in_is_left_unchanged_and_seed_picks_channels(reference):
    _, reference = reference
    weights = {k: v.clone() for k, v in reference.weights().items()}
    a, b, c = (inject_outliers(reference, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(weights[k], v) for k, v in reference.weights().items())
    norm = norm_groups(a)[0].norm.weight.target
    assert torch.equal(a.get_weight(norm), b.get_weight(norm))
    assert not torch.equal(a.get_weight(norm), c.get_weight(norm))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=any_config(), seed=st.integers(0, 2**16))
def test_every_family_function_kept(config, seed):
    model = build_model(config, seed=seed)
    program = llmopt.capture(model)
    injected = inject_outliers(program, channels=CHANNELS, factor=FACTOR, seed=seed)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    assert relative_error(program(ids), injected(ids)) < 1e-5
    assert_scaled_channels(program, injected)
