"""The per-channel estimators of `aofp_onnx.estimate` against direct computations, and the search
ranking with them (against the fake damage of test_search: t_g = Σ_{c∈R} u_c / Σ_{c∈K} u_c).

- ridge_fit is the ridge solution on centred masks: the same d as np.linalg.lstsq on the stacked
  system [X̃; √λ·I] d = [ỹ; 0], in both the dual (T < n) and the primal (T ≥ n) form.
- on an additive damage y = b + X d (random halves, T ≥ n), a vanishing ridge recovers the expected
  damage of a random half holding c: b + d_c + (h − 1)/(n − 1)·(Σd − d_c), exactly (a shift of d
  that the fixed half size leaves unidentified cancels in it).
"""
from __future__ import annotations

import numpy as np
import pytest

from aofp_onnx import estimate, search
from test_search import FakeDamage, _importance, _removed, cmap  # noqa: F401  (cmap: the tiny model fixture)


def _halves(rng, trials: int, n: int) -> np.ndarray:
    masks = np.zeros((trials, n), dtype=bool)
    for row in masks:
        row[rng.choice(n, n // 2, replace=False)] = True
    return masks


@pytest.mark.parametrize("trials,n", [(8, 16), (40, 12)])
def test_ridge_fit_equals_lstsq_on_the_stacked_system(trials, n):
    rng = np.random.default_rng(trials)
    masks = _halves(rng, trials, n)
    y = rng.random(trials)
    b, d = estimate.ridge_fit(masks, y, ridge=0.5)
    x = masks.astype(np.float64)
    xc, yc = x - x.mean(axis=0), y - y.mean()
    lam = 0.5 * np.square(xc).sum() / n
    want = np.linalg.lstsq(np.vstack([xc, np.sqrt(lam) * np.eye(n)]), np.concatenate([yc, np.zeros(n)]), rcond=None)[0]
    np.testing.assert_allclose(d, want, rtol=1e-9, atol=1e-12)
    assert b == pytest.approx(y.mean() - x.mean(axis=0) @ want, rel=1e-9)


def test_ridge_scores_are_the_expected_half_damage_of_an_additive_model():
    rng = np.random.default_rng(3)
    n, h = 12, 6
    d_true, b_true = rng.random(n), 0.05
    masks = _halves(rng, 200, n)
    y = b_true + masks @ d_true
    got = estimate.ridge_scores(masks, y, ridge=1e-9)
    want = b_true + d_true + (h - 1) / (n - 1) * (d_true.sum() - d_true)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.array_equal(np.argsort(got), np.argsort(d_true))


def test_mean_scores_and_unmeasured_channels():
    masks = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=bool)
    y = np.array([0.2, 0.4])
    np.testing.assert_allclose(estimate.mean_scores(masks, y), [0.3, 0.4, 0.2, estimate.UNMEASURED])
    assert estimate.ridge_scores(masks, y)[3] == estimate.UNMEASURED
    with pytest.raises(ValueError, match="estimator"):
        estimate.scores("median", masks, y)


def test_ridge_search_removes_exactly_the_unimportant_channels(cmap):  # noqa: F811
    unimportant = {0, 2, 5, 7} | set(range(8, 12))
    fake = FakeDamage(cmap, _importance(cmap, unimportant))
    keep, scores, _ = search.aofp(cmap, fake, threshold=0.01, trials_per_half=16, seed=0, stack=16,
                                  estimator="ridge")
    assert _removed(keep) == unimportant
    assert np.all(scores[sorted(unimportant)] < 0.01)


@pytest.mark.parametrize("estimator", estimate.ESTIMATORS)
def test_same_seed_same_search_for_each_estimator(cmap, estimator):  # noqa: F811
    u = _importance(cmap, {1, 3, 6} | set(range(8, 14)))
    u[8:24] *= np.linspace(0.5, 2.0, 16)

    def go(seed):
        return search.aofp(cmap, FakeDamage(cmap, u), threshold=0.01, trials_per_half=8, flops_target=0.5,
                           seed=seed, stack=8, estimator=estimator)

    (k1, s1, st1), (k2, s2, st2) = go(5), go(5)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(s1, s2)
    assert st1.trials == st2.trials and cmap.macs(k1) <= 0.5 * cmap.total_macs
