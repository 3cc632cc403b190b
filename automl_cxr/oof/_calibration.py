"""Calibration of out-of-fold probabilities: expected calibration error with a patient-level
bootstrap CI, reliability curves, Brier score, and temperature scaling.

* ECE is torchmetrics' top-label ``multiclass_calibration_error`` (L1, ``n_bins`` equal-width
  bins): the bin-size-weighted mean gap between accuracy and confidence of the top class.
* Its 95 % CI resamples whole split groups (patients) with replacement (``n_boot`` replicates,
  percentile interval): a patient's images are correlated, so an image-level bootstrap would
  be too narrow. The replicates use the same bins as torchmetrics, vectorised over replicates.
* Reliability curves are scikit-learn's ``calibration_curve`` (top label, and the positive
  class one-vs-rest), with the count of each bin; the Brier score is scikit-learn's
  ``brier_score_loss`` (multiclass).
* Temperature scaling (Guo et al. 2017) fits one scalar T > 0 minimising the negative
  log-likelihood of ``softmax(log p / T)`` (SciPy's bounded scalar minimiser on log T).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from automl_cxr.engine import group_bootstrap_weights
from automl_cxr.errors import ConfigError

__all__ = [
    "DEFAULT_BINS",
    "apply_temperature",
    "calibration_summary",
    "ece",
    "fit_temperature",
    "nll",
    "reliability_curve",
]

DEFAULT_BINS = 15


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or len(p) != len(y):
        raise ConfigError(
            f"probabilities must be (N, C) with one label per row, but got {p.shape} and {y.shape}"
        )
    if len(y) == 0:
        raise ConfigError("no validated predictions to assess calibration on")
    if np.isnan(p).any():
        raise ConfigError("probabilities contain NaN rows: pass the validated rows only")
    return p, y


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label expected calibration error (torchmetrics, L1 norm, equal-width bins)."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    p, y = _check(probs, labels)
    if n_bins < 1:
        raise ConfigError(f"n_bins must be at least 1, but got n_bins={n_bins}")
    return float(
        multiclass_calibration_error(
            torch.from_numpy(p),
            torch.from_numpy(y),
            num_classes=p.shape[1],
            n_bins=n_bins,
            norm="l1",
            validate_args=False,
        )
    )


def _weighted_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int, w: np.ndarray) -> np.ndarray:
    """ECE of each weight row of `w` (B, N), with torchmetrics' bins (left-closed, 1.0 alone)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges, conf, side="right") - 1
    onehot = np.zeros((len(conf), n_bins + 1))
    onehot[np.arange(len(conf)), idx] = 1.0
    n_b = w @ onehot
    gap = w @ (onehot * (correct - conf)[:, None])
    total = n_b.sum(axis=1)
    return np.abs(gap).sum(axis=1) / np.where(total > 0, total, np.nan)


def reliability_curve(
    y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10
) -> dict[str, list[float]]:
    """scikit-learn's ``calibration_curve`` (uniform bins) with each non-empty bin's count:
    ``{"confidence", "accuracy", "count"}``."""
    from sklearn.calibration import calibration_curve

    y = np.asarray(y_true, dtype=int)
    p = np.clip(np.asarray(y_prob, dtype=np.float64), 0.0, 1.0)
    frac, mean = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    bins = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(bins[1:-1], p)  # scikit-learn's own binning
    counts = np.bincount(ids, minlength=n_bins)
    counts = counts[counts > 0]
    return {
        "confidence": [float(v) for v in mean],
        "accuracy": [float(v) for v in frac],
        "count": [int(v) for v in counts],
    }


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p, y = _check(probs, labels)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: what a graph computing ``logits / T`` outputs."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, but got {temperature}")
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The temperature T in [0.05, 20] minimising the NLL of ``softmax(log p / T)``; returns
    ``{"temperature", "nll_before", "nll_after"}``."""
    from scipy.optimize import minimize_scalar

    p, y = _check(probs, labels)
    res = minimize_scalar(
        lambda log_t: nll(apply_temperature(p, float(np.exp(log_t))), y),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    t = float(np.exp(res.x))
    before, after = nll(p, y), nll(apply_temperature(p, t), y)
    if after > before:  # never worse than no scaling
        t, after = 1.0, before
    return {"temperature": t, "nll_before": before, "nll_after": after}


def calibration_summary(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    classes: list[str] | None = None,
    positive: str | None = None,
    n_bins: int = DEFAULT_BINS,
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """ECE with a patient-level bootstrap 95 % CI, Brier score, NLL, and reliability curves
    (top label; the positive class vs rest when `positive` is given)."""
    from sklearn.metrics import brier_score_loss

    p, y = _check(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    value = ece(p, y, n_bins)
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    reps = _weighted_ece(conf, correct, n_bins, group_bootstrap_weights(g, n_boot, seed))
    lo, hi = (float(v) for v in np.nanpercentile(reps, [2.5, 97.5]))
    out: dict[str, Any] = {
        "ece": value,
        "ece_ci_low": lo,
        "ece_ci_high": hi,
        "n_bins": n_bins,
        "n": len(y),
        "n_groups": len(np.unique(g)),
        "n_boot": n_boot,
        "brier": float(brier_score_loss(y, p, labels=list(range(p.shape[1])))),
        "nll": nll(p, y),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(conf.mean()),
        "reliability": reliability_curve(correct, conf, n_bins=10),
    }
    if positive is not None and classes is not None and positive in classes:
        k = classes.index(positive)
        out["positive"] = positive
        out["reliability_positive"] = reliability_curve(y == k, p[:, k], n_bins=10)
    return out
