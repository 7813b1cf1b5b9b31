"""Tests of `llmopt.passes.compress.prune`: scores, exact N:M counts, Wanda vs magnitude, 2:4 layout."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.passes.compress import is_2_4_sparse, magnitude_scores, prune_mask, to_semi_structured, wanda_scores


def test_magnitude_scores_are_absolute_values():
    w = torch.tensor([[-2.0, 0.5], [0.0, -1.0]])
    assert torch.equal(magnitude_scores(w), w.abs())


def test_wanda_keeps_weights_on_high_norm_inputs_where_magnitude_would_not():
    w = torch.tensor([[1.0, 0.5, -0.9, 0.2]])  # magnitude keeps inputs 0 and 2
    x = torch.tensor([[0.1, 8.0, 0.1, 6.0], [-0.1, 6.0, 0.1, -8.0]])  # inputs 1 and 3 carry the signal
    act_norm = x.norm(dim=0)  # [K] ‖X_j‖₂
    by_magnitude = prune_mask(magnitude_scores(w), 0.5)
    by_wanda = prune_mask(wanda_scores(w, act_norm), 0.5)
    assert by_magnitude.tolist() == [[True, False, True, False]]
    assert by_wanda.tolist() == [[False, True, False, True]]
    # and the Wanda mask loses less of the output on these inputs
    loss = lambda keep: float((x @ (w * ~keep).t()).norm())  # noqa: E731
    assert loss(by_wanda) < loss(by_magnitude)


def test_wanda_accepts_squared_sums():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 16, generator=g), torch.randn(32, 16, generator=g)
    by_norm = wanda_scores(w, x.norm(dim=0))
    by_sq_sum = wanda_scores(w, act_sq_sum=x.pow(2).sum(0))
    torch.testing.assert_close(by_sq_sum, by_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(by_norm, w.abs() * x.norm(dim=0), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 8),
    k=st.integers(1, 64),
    sparsity=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**16),
)
def test_unstructured_prunes_the_lowest_scores_of_each_row(n, k, sparsity, seed):
    scores = torch.rand(n, k, generator=torch.Generator().manual_seed(seed))
    keep = prune_mask(scores, sparsity)
    assert keep.dtype == torch.bool and keep.shape == (n, k)
    assert (~keep).sum(1).tolist() == [int(k * sparsity)] * n
    for row in range(n):
        pruned, kept = scores[row][~keep[row]], scores[row][keep[row]]
        if len(pruned) and len(kept):
            assert float(pruned.max()) <= float(kept.min())


@settings(max_examples=25, deadline=None)
@given(
    nm=st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 8), (1, 2)]),
    n=st.integers(1, 8),
    groups=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_n_m_prunes_exactly_n_of_every_m(nm, n, groups, seed):
    n_zero, m = nm
    scores = torch.rand(n, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = prune_mask(scores, pattern=f"{n_zero}:{m}")
    kept = keep.reshape(n, groups, m)
    assert bool((kept.sum(-1) == m - n_zero).all())  # "2:4": 2 zeros and 2 kept in every 4
    s = scores.reshape(n, groups, m)
    pruned_max = s.masked_fill(kept, float("-inf")).amax(-1)
    kept_min = s.masked_fill(~kept, float("inf")).amin(-1)
    assert bool((pruned_max <= kept_min).all())


def test_ties_are_deterministic():
    keep = prune_mask(torch.ones(2, 8), pattern="2:4")
    assert keep.tolist() == [[False, False, True, True] * 2] * 2


def test_n_m_accepts_its_own_sparsity():
    scores = torch.rand(4, 8)
    assert torch.equal(prune_mask(scores, 0.25, "1:4"), prune_mask(scores, pattern="1:4"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 0.0}, "strictly between 0 and 1"),
        ({"sparsity": 1.0}, "strictly between 0 and 1"),
        ({"sparsity": -0.5}, "strictly between 0 and 1"),
        ({"pattern": "2:3"}, "M=3 to divide K=8"),
        ({"pattern": "half"}, "not 'unstructured' or 'N:M'"),
        ({"pattern": "2 : 4"}, "not 'unstructured' or 'N:M'"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "0:4"}, "0 < N < M"),
        ({"pattern": "2:4", "sparsity": 0.3}, "fixes sparsity 0.5"),
    ],
)
def test_bad_masks_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune_mask(torch.rand(4, 8), **kwargs)


def test_bad_scores_raise():
    with pytest.raises(ValueError, match="2-D"):
        prune_mask(torch.rand(8))
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune_mask(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="exactly one"):
        wanda_scores(torch.rand(2, 4))
    with pytest.raises(ValueError, match="expected \\[K=4\\]"):
        wanda_scores(torch.rand(2, 4), torch.rand(3))


def _two_four(n, k, dtype=torch.float32, device="cpu"):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    return w * prune_mask(magnitude_scores(w), pattern="2:4")


def test_is_2_4_sparse_counts_nonzeros_per_group_of_four():
    assert is_2_4_sparse(_two_four(8, 16))
    assert is_2_4_sparse(torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 0.0]]))  # more zeros is fine
    assert not is_2_4_sparse(torch.tensor([[1.0, 2.0, 0.0, 3.0]]))
    assert not is_2_4_sparse(torch.zeros(2, 6))  # K not a multiple of 4


def test_semi_structured_is_none_on_cpu():
    assert to_semi_structured(_two_four(64, 128)) is None


def test_semi_structured_rejects_dense_weights():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        to_semi_structured(torch.ones(4, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the H200 device machine)")
def test_semi_structured_on_cuda_matches_dense():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparsity needs compute capability >= 8.0")
    w = _two_four(128, 256, torch.float16, "cuda")
    sparse = to_semi_structured(w)
    assert sparse is not None
    assert torch.equal(sparse.to_dense(), w)
    x = torch.randn(64, 256, dtype=torch.float16, device="cuda")
    # fp16 operands, fp32 accumulation in both: 1e-2 relative covers the different summation orders
    torch.testing.assert_close(torch.nn.functional.linear(x, sparse), x @ w.t(), rtol=1e-2, atol=1e-2)
