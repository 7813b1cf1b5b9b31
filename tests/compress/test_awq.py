"""Tests of `llmopt.passes.compress.awq`: the AWQ scale and clip searches against direct error sums."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.passes.compress import calib, fake_quantize_groups, quantize_groups, search_awq_clip, search_awq_scales


def _output_error(x, w, w_hat) -> float:
    """‖x·(Ŵ - W)ᵀ‖² in fp64: the quantity both searches minimize, computed the direct way."""
    return float((x.double() @ (w_hat.double() - w.double()).t()).pow(2).sum())


def _awq_error(x, weights, s, bits, group_size) -> float:
    """Σ_i ‖Q(W_i·s)·(x/s)ᵀ - W_i·xᵀ‖², evaluated literally as the paper writes it."""
    total = 0.0
    for w in weights:
        q = fake_quantize_groups(w * s, bits, group_size)
        total += float(((x / s).double() @ q.double().t() - x.double() @ w.double().t()).pow(2).sum())
    return total


def _outlier_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g)
    x[:, [3, 40, 77, 100]] *= 30  # outlier input channels, as in large LLMs
    return x, [torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)]


@settings(max_examples=20, deadline=None)
@given(
    n_tokens=st.integers(8, 200),  # both below and above K: the direct and the Gram error paths
    n_groups=st.integers(1, 4),
    group_size=st.sampled_from([16, 32]),
    outs=st.lists(st.integers(4, 24), min_size=1, max_size=3),
    bits=st.sampled_from([3, 4, 8]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_scale_search_never_worse_than_rtn(n_tokens, n_groups, group_size, outs, bits, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    k = n_groups * group_size
    x = torch.randn(n_tokens, k, generator=g) * torch.rand(k, generator=g) * 3  # uneven channels
    weights = [torch.randn(n, k, generator=g) for n in outs]
    scales, alpha, duo, errors, candidates = search_awq_scales(x, weights, bits, group_size, grid=5, symmetric=symmetric)
    assert errors.shape == (2, 6) and bool(torch.isfinite(errors).all())  # [family (plain, duo), alpha]
    assert scales.shape == (k,) and bool((scales > 0).all()) and bool(torch.isfinite(scales).all())
    family, i = divmod(int(errors.argmin()), 6)
    assert candidates.shape == (2, 6, k) and torch.equal(candidates[family, i], scales)
    assert alpha == pytest.approx(i / 5) and duo == (family == 1)
    assert float(errors.min()) <= float(errors[0, 0])
    # plain alpha = 0 is RTN; errors are mean squared output errors over the n·ΣN outputs
    count = n_tokens * sum(outs)
    rtn = sum(_output_error(x, w, fake_quantize_groups(w, bits, group_size, symmetric)) for w in weights)
    assert float(errors[0, 0]) * count == pytest.approx(rtn, rel=1e-3, abs=1e-6)
    # the returned scales achieve the reported error, evaluated literally, never above RTN
    chosen = sum(
        _output_error(x, w, fake_quantize_groups(w * scales, bits, group_size, symmetric) / scales) for w in weights
    )
    assert float(errors.min()) * count == pytest.approx(chosen, rel=1e-3, abs=1e-6)
    assert chosen <= rtn * (1 + 1e-3) + 1e-6


def test_scale_search_strictly_better_with_outlier_channels():
    x, weights = _outlier_case()
    scales, alpha, _, errors, _ = search_awq_scales(x, weights, 4, 32)
    assert alpha > 0
    rtn = _awq_error(x, weights, torch.ones(128), 4, 32)
    awq = _awq_error(x, weights, scales, 4, 32)
    assert awq < 0.5 * rtn, (awq, rtn)  # measured: about 0.18 of the RTN error
    assert float(errors.min()) < 0.5 * float(errors[0, 0])
    # outlier channels get the largest scales (their weights are protected)
    assert set(scales.topk(4).indices.tolist()) == {3, 40, 77, 100}


@pytest.mark.parametrize("duo", [False, True])
def test_scale_search_candidates_match_autoawq(duo):
    x, weights = _outlier_case()
    scales, alpha, chosen_duo, errors, _ = search_awq_scales(x, weights, 4, 32, duo=duo)
    assert errors.shape[0] == (2 if duo else 1)
    s = x.abs().mean(0).pow(alpha)
    if chosen_duo:  # AutoAWQ's duo scaling: divided by the mean group-relative |W| per input channel
        w = torch.cat(weights).abs().reshape(-1, 32)
        w_mean = (w / (w.amax(dim=1, keepdim=True) + 1e-6)).reshape(-1, 128).mean(0)
        s = s / (w_mean.pow(1 - alpha) + 1e-4)
    s = s.clamp_min(1e-4)
    torch.testing.assert_close(scales, s / (s.max() * s.min()).sqrt(), rtol=1e-5, atol=0)


def test_duo_candidates_only_add_to_the_grid():
    x, weights = _outlier_case()
    plain = search_awq_scales(x, weights, 3, 32, duo=False)
    both = search_awq_scales(x, weights, 3, 32, duo=True)
    torch.testing.assert_close(both.errors[0], plain.errors[0])
    assert float(both.errors.min()) <= float(plain.errors.min())


def test_scale_search_chunked_equals_unchunked(monkeypatch):
    x, weights = _outlier_case()
    whole = search_awq_scales(x, weights, 4, 32)
    monkeypatch.setitem(calib.CHUNK_ELEMENTS, "cpu", 30000)  # about 11 rows per chunk
    chunked = search_awq_scales(x, weights, 4, 32)
    torch.testing.assert_close(chunked.errors, whole.errors, rtol=1e-5, atol=0)
    assert chunked.alpha == whole.alpha


def _gqa_ties(heads: int = 4, kv_heads: int = 2, head_dim: int = 32) -> torch.Tensor:
    """[heads·head_dim]: the v channel each o_proj input channel reads (query head h reads KV head h // (heads / kv_heads))."""
    h = torch.arange(heads).repeat_interleave(head_dim)
    return (h // (heads // kv_heads)) * head_dim + torch.arange(head_dim).repeat(heads)


@pytest.mark.parametrize("duo", [False, True])
def test_tied_scale_candidates_are_equal_over_each_tied_set_and_pool_the_means(duo):
    x, weights = _outlier_case()  # K = 128 = 4 heads of 32 channels on 2 KV heads
    ties = _gqa_ties()
    found = search_awq_scales(x, weights, 4, 32, duo=duo, ties=ties)
    candidates = found.candidates.reshape(-1, 128)  # [F·A, K]
    one_per_set = torch.zeros(candidates.shape[0], 64).scatter_(1, ties.expand_as(candidates), candidates)  # [F·A, 64]
    assert torch.equal(candidates, one_per_set[:, ties])  # equal over every tied set, so it folds into v
    # the plain family's alpha = 1 candidate is the mean |x| pooled over the tied channels (up to the normalization)
    head = x.abs().mean(0).reshape(4, 32)  # [query head, channel]
    pooled = torch.cat([(head[0] + head[1]) / 2, (head[2] + head[3]) / 2])  # [64]: heads 0, 1 read KV head 0
    s = pooled[ties]
    torch.testing.assert_close(candidates[20], s / (s.max() * s.min()).sqrt(), rtol=1e-5, atol=0)
    assert float(found.errors.min()) <= float(found.errors[0, 0])  # plain alpha = 0 (RTN) is still on the grid


def test_ties_of_singletons_change_nothing():
    x, weights = _outlier_case()
    free = search_awq_scales(x, weights, 4, 32)
    singletons = search_awq_scales(x, weights, 4, 32, ties=torch.arange(128))
    assert torch.equal(free.candidates, singletons.candidates) and torch.equal(free.errors, singletons.errors)


def test_tied_search_never_worse_than_rtn_and_free_search_no_worse_than_tied():
    x, weights = _outlier_case(seed=3)
    x = x[:, torch.randperm(128, generator=torch.Generator().manual_seed(1))]  # outliers land in different tied sets
    free = search_awq_scales(x, weights, 3, 32)
    tied = search_awq_scales(x, weights, 3, 32, ties=_gqa_ties())
    assert float(tied.errors.min()) < float(tied.errors[0, 0])
    torch.testing.assert_close(tied.errors[0, 0], free.errors[0, 0])  # both start from RTN
    assert float(free.errors.min()) <= float(tied.errors.min()) * 1.05  # fewer degrees of freedom


def _group_errors(x, w, w_hat, group_size):
    """[N, ng]: Σ_t (x_t,g · (ŵ_n,g - w_n,g))², each group's share of the output error (fp64)."""
    n, k = w.shape
    xg = x.double().reshape(-1, k // group_size, group_size)  # [T, ng, G]
    d = (w_hat.double() - w.double()).reshape(n, k // group_size, group_size)  # [N, ng, G]
    return torch.einsum("tgi,ngi->tng", xg, d).pow(2).sum(0)


@st.composite
def _clip_cases(draw, bits):
    """(x [T, K], heavy-tailed w [N, K], group_size, bits, symmetric) for the clip searches."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n_tokens, n_out, n_groups = draw(st.integers(4, 150)), draw(st.integers(1, 20)), draw(st.integers(1, 3))
    group_size = draw(st.sampled_from([16, 32]))
    k = n_groups * group_size
    x = torch.randn(n_tokens, k, generator=g)
    w = torch.randn(n_out, k, generator=g) * torch.randn(n_out, k, generator=g).exp()  # heavy tails
    return x, w, group_size, draw(st.sampled_from(bits)), draw(st.booleans())


@settings(max_examples=15, deadline=None)
@given(case=_clip_cases(bits=[3, 4, 8]))
def test_clip_search_never_increases_group_error(case):
    x, w, group_size, bits, symmetric = case
    clip = search_awq_clip(x, w, bits, group_size, symmetric=symmetric)
    assert clip.shape == (w.shape[0], w.shape[1] // group_size)
    grid = 1 - torch.arange(10) / 20  # 1, 0.95, ..., 0.55
    assert bool(torch.isclose(clip.unsqueeze(-1), grid).any(-1).all())
    clipped = _group_errors(x, w, fake_quantize_groups(w, bits, group_size, symmetric, clip_ratio=clip), group_size)
    plain = _group_errors(x, w, fake_quantize_groups(w, bits, group_size, symmetric), group_size)
    scale = float(plain.max()) + 1e-12
    assert bool((clipped <= plain + 1e-4 * scale).all()), float((clipped - plain).max() / scale)


def test_clip_search_lowers_output_error_on_heavy_tailed_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    w = torch.randn(64, 128, generator=g) * torch.randn(64, 128, generator=g).exp()
    clip = search_awq_clip(x, w, 4, 32)
    assert bool((clip < 1).any())
    clipped = _output_error(x, w, fake_quantize_groups(w, 4, 32, clip_ratio=clip))
    plain = _output_error(x, w, fake_quantize_groups(w, 4, 32))
    assert clipped < 0.99 * plain, (clipped, plain)  # measured: about 0.975


@pytest.mark.parametrize("joint_sweeps", [0, 2])
def test_clip_search_chunked_equals_unchunked(monkeypatch, joint_sweeps):
    x, weights = _outlier_case()
    whole = search_awq_clip(x, weights[0], 4, 32, joint_sweeps=joint_sweeps)
    monkeypatch.setitem(calib.CHUNK_ELEMENTS, "cpu", 6000)  # 4 rows per chunk (16 when descending jointly)
    assert torch.equal(search_awq_clip(x, weights[0], 4, 32, joint_sweeps=joint_sweeps), whole)


def test_clip_search_without_shrink_keeps_everything():
    x, weights = _outlier_case()
    assert bool((search_awq_clip(x, weights[0], 4, 32, max_shrink=0.0) == 1).all())


def test_bad_inputs_raise():
    x, weights = _outlier_case()
    with pytest.raises(ValueError, match="no weights"):
        search_awq_scales(x, [], 4, 32)
    with pytest.raises(ValueError, match="every weight must be"):
        search_awq_scales(x, [weights[0], torch.randn(8, 64)], 4, 32)
    with pytest.raises(ValueError, match="64 channels, the weights expect K=128"):
        search_awq_scales(x[:, :64], weights, 4, 32)
    with pytest.raises(ValueError, match="does not divide"):
        search_awq_scales(x, weights, 4, 48)
    with pytest.raises(ValueError, match="grid=0"):
        search_awq_scales(x, weights, 4, 32, grid=0)
    with pytest.raises(ValueError, match="ties must be"):
        search_awq_scales(x, weights, 4, 32, ties=torch.arange(64))
    with pytest.raises(ValueError, match="max_shrink"):
        search_awq_clip(x, weights[0], 4, 32, max_shrink=1.0)
    with pytest.raises(ValueError, match="2-D"):
        search_awq_clip(x, weights[0][0], 4, 32)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        search_awq_clip(bad, weights[0], 4, 32)


@settings(max_examples=15, deadline=None)
@given(case=_clip_cases(bits=[3, 4]))
def test_separate_clip_never_worse_than_one_ratio(case):
    x, w, group_size, bits, symmetric = case
    pairs = search_awq_clip(x, w, bits, group_size, symmetric=symmetric, separate=True)
    assert pairs.shape == (w.shape[0], w.shape[1] // group_size, 2) and bool(((pairs > 0) & (pairs <= 1)).all())
    one = search_awq_clip(x, w, bits, group_size, symmetric=symmetric)
    separate = _group_errors(x, w, fake_quantize_groups(w, bits, group_size, symmetric, clip_ratio=pairs), group_size)
    joint = _group_errors(x, w, fake_quantize_groups(w, bits, group_size, symmetric, clip_ratio=one), group_size)
    scale = float(joint.max()) + 1e-12
    assert bool((separate <= joint + 1e-4 * scale).all()), float((separate - joint).max() / scale)


def test_separate_clip_lowers_output_error_on_lopsided_groups():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    w = torch.randn(64, 128, generator=g)
    w[:, ::32] = 8.0  # one large positive weight per group: the range's two ends are far from symmetric
    pairs = search_awq_clip(x, w, 3, 32, separate=True)
    assert bool((pairs[..., 0] != pairs[..., 1]).any())
    separate = _output_error(x, w, fake_quantize_groups(w, 3, 32, clip_ratio=pairs))
    joint = _output_error(x, w, fake_quantize_groups(w, 3, 32, clip_ratio=search_awq_clip(x, w, 3, 32)))
    assert separate < 0.97 * joint, (separate, joint)  # measured: about 0.94


def test_quantize_groups_with_separate_clip_matches_fake_quantization():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    ratio = torch.rand(16, 2, 2, generator=g) * 0.5 + 0.5  # [N, ng, (max, min)]
    q = quantize_groups(w, 4, 32, clip_ratio=ratio)
    torch.testing.assert_close(q.dequantize(), fake_quantize_groups(w, 4, 32, clip_ratio=ratio), rtol=0, atol=0)
    wg = w.reshape(16, 2, 32)
    lo, hi = wg.amin(-1).clamp_max(0) * ratio[..., 1], wg.amax(-1).clamp_min(0) * ratio[..., 0]
    torch.testing.assert_close(q.scales, (hi - lo) / 15, rtol=1e-6, atol=0)


def _row_errors(x, w, w_hat) -> torch.Tensor:
    """[N] fp64: each output row's ‖x·(ŵ_n - w_n)ᵀ‖², cross-group terms included."""
    return (x.double() @ (w_hat.double() - w.double()).t()).pow(2).sum(dim=0)


@settings(max_examples=15, deadline=None)
@given(case=_clip_cases(bits=[3, 4]), separate=st.booleans(), shift=st.floats(0.0, 3.0))
def test_joint_clip_sweeps_never_raise_a_rows_error(case, separate, shift):
    x, w, group_size, bits, symmetric = case
    x = x + shift  # a common offset correlates the groups' inputs
    start = search_awq_clip(x, w, bits, group_size, symmetric=symmetric, separate=separate)
    swept = search_awq_clip(x, w, bits, group_size, symmetric=symmetric, separate=separate, joint_sweeps=2)
    assert swept.shape == start.shape
    before = _row_errors(x, w, fake_quantize_groups(w, bits, group_size, symmetric, clip_ratio=start))
    after = _row_errors(x, w, fake_quantize_groups(w, bits, group_size, symmetric, clip_ratio=swept))
    scale = float(before.max()) + 1e-12
    assert bool((after <= before + 1e-4 * scale).all()), float((after - before).max() / scale)


@pytest.mark.parametrize("separate", [False, True])
def test_joint_clip_lowers_output_error_on_correlated_inputs(separate):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 384, generator=g) + torch.randn(384, generator=g) * 2  # [n, K], a shared offset
    w = torch.randn(64, 384, generator=g) * 0.05
    start = search_awq_clip(x, w, 3, 128, separate=separate)
    swept = search_awq_clip(x, w, 3, 128, separate=separate, joint_sweeps=3)
    before = _output_error(x, w, fake_quantize_groups(w, 3, 128, clip_ratio=start))
    after = _output_error(x, w, fake_quantize_groups(w, 3, 128, clip_ratio=swept))
    assert after < 0.97 * before, (after, before)  # measured: 0.86 (one ratio), 0.95 (separate)


def test_joint_clip_sweeps_must_not_be_negative():
    x, weights = _outlier_case()
    with pytest.raises(ValueError, match="joint_sweeps"):
        search_awq_clip(x, weights[0], 4, 32, joint_sweeps=-1)
