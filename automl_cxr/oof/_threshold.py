"""Operating points on the positive class, chosen on out-of-fold predictions.

A rule is ``sensitivity=0.95`` (the highest threshold whose sensitivity is at least 0.95, so
the best specificity with it), ``specificity=0.9`` (the lowest threshold whose specificity is
at least 0.9), or ``youden`` (the threshold maximising sensitivity + specificity − 1). The
candidates are scikit-learn's ``roc_curve`` thresholds; a row is called positive when its
positive-class probability is ``>= threshold`` (the same convention), otherwise it gets the
arg-max of the other classes (:func:`decide`).

Expected sensitivity and specificity at the chosen point come with patient-level bootstrap
95 % CIs (whole split groups resampled, threshold held fixed). `operating_point` chooses the
point on the very predictions it scores, so the sensitivity asked for is met there by
construction; `automl_cxr.oof._crossfit` chooses it on other folds than it scores, and an
external set (``evaluate``) is the honest check beyond the training sources.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from automl_cxr.engine import group_bootstrap_weights
from automl_cxr.errors import ConfigError

__all__ = [
    "RULES",
    "choose_threshold",
    "decide",
    "operating_point",
    "parse_operating_point",
    "rates_at",
]

RULES = ("sensitivity", "specificity", "youden")


def parse_operating_point(text: str) -> tuple[str, float | None]:
    """``"sensitivity=0.95"`` → ``("sensitivity", 0.95)``; ``"youden"`` → ``("youden", None)``."""
    s = str(text).strip().lower()
    if s == "youden":
        return "youden", None
    rule, sep, value = s.partition("=")
    rule = rule.strip()
    if not sep or rule not in ("sensitivity", "specificity"):
        raise ConfigError(
            f"--operating-point must be sensitivity=X, specificity=X (0 < X < 1) or youden, "
            f"but got {text!r}"
        )
    try:
        target = float(value)
    except ValueError:
        raise ConfigError(f"--operating-point {rule} must be a number, but got {value!r}") from None
    if not 0.0 < target < 1.0:
        raise ConfigError(f"--operating-point {rule} must be in (0, 1), but got {rule}={target}")
    return rule, target


def choose_threshold(
    scores: np.ndarray, is_pos: np.ndarray, rule: str, target: float | None
) -> float:
    """The threshold on `scores` (positive-class probabilities) that meets `rule`."""
    from sklearn.metrics import roc_curve

    y = np.asarray(is_pos, dtype=bool)
    if y.all() or not y.any():
        raise ConfigError(
            "an operating point needs positive and negative rows, but the predictions have "
            f"{int(y.sum())} positive of {len(y)}"
        )
    fpr, tpr, thr = roc_curve(y, np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    if rule == "sensitivity":
        i = int(np.flatnonzero(tpr >= float(target) - 1e-12)[0])
    elif rule == "specificity":
        i = int(np.flatnonzero(fpr <= 1.0 - float(target) + 1e-12)[-1])
    elif rule == "youden":
        i = int(np.argmax(tpr - fpr))
    else:
        raise ConfigError(f"operating-point rule must be one of {', '.join(RULES)}, got {rule!r}")
    t = float(thr[i])
    return min(t, 1.0) if np.isfinite(t) else 1.0 + 1e-9


def decide(probs: np.ndarray, positive_index: int, threshold: float) -> np.ndarray:
    """Class index per row: the positive class when its probability is ``>= threshold``,
    otherwise the most probable of the other classes."""
    p = np.asarray(probs, dtype=np.float64)
    others = p.copy()
    others[:, positive_index] = -np.inf
    return np.where(p[:, positive_index] >= threshold, positive_index, others.argmax(axis=1))


def rates_at(
    called: np.ndarray,
    is_pos: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Sensitivity and specificity of fixed positive calls, with patient-bootstrap 95 % CIs
    (whole groups resampled; NaN where a class is absent)."""
    called = np.asarray(called, dtype=bool)
    pos = np.asarray(is_pos, dtype=bool)
    g = np.arange(len(pos)) if groups is None else np.asarray(groups)
    w = group_bootstrap_weights(g, n_boot, seed)

    def rate(hit: np.ndarray, base: np.ndarray) -> tuple[float, float, float]:
        if not base.any():
            return float("nan"), float("nan"), float("nan")
        est = float(hit[base].mean())
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = (w @ (hit & base)) / (w @ base)
        lo, hi = np.nanpercentile(reps, [2.5, 97.5])
        return est, float(lo), float(hi)

    sens = rate(called, pos)
    spec = rate(~called, ~pos)
    return {
        "sensitivity": sens[0],
        "sensitivity_ci_low": sens[1],
        "sensitivity_ci_high": sens[2],
        "specificity": spec[0],
        "specificity_ci_low": spec[1],
        "specificity_ci_high": spec[2],
        "n_positive": int(pos.sum()),
        "n_negative": int((~pos).sum()),
        "n_groups": len(np.unique(g)),
        "n_boot": n_boot,
    }


def operating_point(
    probs: np.ndarray,
    labels: np.ndarray,
    positive_index: int,
    rule: str,
    target: float | None = None,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Choose the threshold and report sensitivity/specificity there with bootstrap CIs, on
    the same predictions (in-sample; `crossfit_operating_point` scores held-out parts)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    pos = y == positive_index
    t = choose_threshold(p[:, positive_index], pos, rule, target)
    called = p[:, positive_index] >= t
    argmax_called = p.argmax(axis=1) == positive_index
    return {
        "rule": rule,
        "target": target,
        "threshold": t,
        **rates_at(called, pos, groups, n_boot=n_boot, seed=seed),
        "argmax_sensitivity": float(argmax_called[pos].mean()),
        "argmax_specificity": float((~argmax_called)[~pos].mean()),
    }
