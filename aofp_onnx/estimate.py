"""Per-channel damage estimates from one group's random-half trials (the AOFP ranking step).

A group's trials so far in its search space S (|S| = n, each trial removes a random half R, |R| = h):
the masks X [T, n] (X[t, c] = 1 when trial t removed channel c) and the damages y [T].

- **mean** (the paper): s_c = Σ_t X[t, c]·y_t / Σ_t X[t, c], the mean damage of the trials that removed c.
- **ridge**: fit the additive model y_t ≈ b + Σ_c X[t, c]·d_c by ridge least squares on the centred
  masks, d = argmin ‖X̃d − ỹ‖² + λ‖d‖² with λ = `RIDGE` · tr(X̃ᵀX̃)/n (scale-free; the half size
  is fixed, so Σ_c X̃[t, c] = 0 and the plain least-squares problem has no unique answer), b = ȳ − x̄ᵀd.
  Where the mean credits c with the damage of the h − 1 channels removed beside it, the fit shares
  each trial's damage among them. Its scores are put on the mean's scale (AOFP compares them to the
  threshold): the model's expected damage of a random half that holds c,
      s_c = b + d_c + (h − 1)/(n − 1) · (Σ_j d_j − d_c),
  which ranks exactly like d_c. Solved in the smaller of the primal (n × n) and dual (T × T) forms.

A channel no trial removed scores `UNMEASURED` (ranks as important) under both.
"""
from __future__ import annotations

import numpy as np

ESTIMATORS = ("mean", "ridge")
UNMEASURED = 1e9  # score of a channel no trial has measured yet
RIDGE = 0.01  # λ relative to the mean diagonal of X̃ᵀX̃ (benchmarks/estimators.py measures the choice)


def mean_scores(masks: np.ndarray, damage: np.ndarray) -> np.ndarray:
    """The mean damage of the trials that removed each column's channel; [T, n], [T] -> [n]."""
    count = masks.sum(axis=0)
    total = masks.T.astype(np.float64) @ damage
    return np.where(count > 0, total / np.maximum(count, 1), UNMEASURED)


def ridge_fit(masks: np.ndarray, damage: np.ndarray, ridge: float = RIDGE) -> tuple[float, np.ndarray]:
    """(b, d) of the ridge fit y ≈ b + X d (see the module docstring); [T, n], [T]."""
    x = masks.astype(np.float64)
    y = damage.astype(np.float64)
    xm, ym = x.mean(axis=0), y.mean()
    xc, yc = x - xm, y - ym
    lam = ridge * max(float(np.square(xc).sum()) / x.shape[1], 1e-12)
    t, n = xc.shape
    if t < n:  # dual: d = X̃ᵀ(X̃X̃ᵀ + λI)⁻¹ỹ
        d = xc.T @ np.linalg.solve(xc @ xc.T + lam * np.eye(t), yc)
    else:
        d = np.linalg.solve(xc.T @ xc + lam * np.eye(n), xc.T @ yc)
    return float(ym - xm @ d), d


def ridge_scores(masks: np.ndarray, damage: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """The ridge fit's expected damage of a random half holding each channel; [T, n], [T] -> [n]."""
    count = masks.sum(axis=0)
    n = masks.shape[1]
    if len(damage) < 2 or n < 2:
        return mean_scores(masks, damage)
    b, d = ridge_fit(masks, damage, ridge)
    h = int(round(masks.sum(axis=1).mean()))
    shared = (h - 1) / (n - 1)
    return np.where(count > 0, b + d + shared * (d.sum() - d), UNMEASURED)


def scores(estimator: str, masks: np.ndarray, damage: np.ndarray) -> np.ndarray:
    """Per-column scores by `estimator` ('mean' or 'ridge')."""
    if estimator == "mean":
        return mean_scores(masks, damage)
    if estimator == "ridge":
        return ridge_scores(masks, damage)
    raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
