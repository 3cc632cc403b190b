"""Cross-fitted calibration and operating points: fitted on some folds, scored on the other.

A temperature or a threshold fitted on predictions and scored on the same predictions
describes itself, not the model in use: the ECE after scaling is optimistic and the asked-for
sensitivity is met by construction. Here each part (a cross-validation fold, or a patient
group of a calibration holdout) gets the temperature / threshold fitted on the *other* parts,
and the figures are computed on the pooled held-out results, with patient-bootstrap CIs and
the per-part values. The in-sample figure is returned beside it, labelled as such.

Parts come from :func:`crossfit_parts`: the folds the predictions were validated in when there
are at least two, else a stratified split of the patients (a holdout, or an export's
calibration set). A part whose other parts cannot fit (e.g. no positive row for a threshold)
is left out and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from automl_cxr.errors import ConfigError
from automl_cxr.oof._calibration import (
    apply_temperature,
    calibration_summary,
    ece,
    fit_temperature,
)
from automl_cxr.oof._threshold import choose_threshold, operating_point, rates_at

__all__ = [
    "CROSSFIT_PARTS",
    "crossfit_operating_point",
    "crossfit_parts",
    "crossfit_temperature",
]

CROSSFIT_PARTS = 5
"""Patient parts when the predictions carry fewer than two folds."""

_KEEP = ("ece", "ece_ci_low", "ece_ci_high", "brier", "nll", "n", "n_groups", "n_bins")


def crossfit_parts(
    labels: np.ndarray,
    groups: np.ndarray,
    folds: np.ndarray | None = None,
    *,
    n_parts: int = CROSSFIT_PARTS,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """(part id per row, how the parts were made). The validation folds when `folds` holds at
    least two, else `n_parts` (at most one per patient) stratified patient groups."""
    y = np.asarray(labels)
    if folds is not None and len(np.unique(np.asarray(folds))) >= 2:
        return np.asarray(folds, dtype=np.int64), "validation folds"
    from sklearn.model_selection import StratifiedGroupKFold

    g = np.asarray(groups).astype(str)
    n = min(n_parts, len(np.unique(g)))
    if n < 2:
        raise ConfigError(
            f"cross-fitting needs at least 2 patients, but the predictions hold {n} patient(s)"
        )
    parts = np.empty(len(y), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    for i, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y, g)):
        parts[held] = i
    return parts, f"{n} stratified patient parts"


def _per_part(parts: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    return [(int(p), parts != p, parts == p) for p in np.unique(parts)]


def _mean_ci(values: list[float]) -> dict[str, float | None]:
    """Mean of per-part values with a t interval over the parts (None with fewer than 2)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "ci_low": None, "ci_high": None}
    if len(v) < 2:
        return {"mean": float(v[0]), "ci_low": None, "ci_high": None}
    from scipy.stats import t

    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {
        "mean": float(v.mean()),
        "ci_low": float(v.mean() - half),
        "ci_high": float(v.mean() + half),
    }


def crossfit_temperature(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    parts: np.ndarray,
    *,
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Temperature fitted on all parts but one and applied to that one, for every part.

    Returns ``before`` (the probabilities as they are), ``after`` (the pooled cross-fitted
    probabilities: ECE with its patient-bootstrap CI, Brier, NLL), ``per_part`` (each part's
    temperature and ECE), ``part_mean`` (mean ECE over parts with a t interval), and
    ``in_sample_after`` (one temperature fitted on everything and scored there: optimistic).
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    g = np.asarray(groups)
    out_p = np.full_like(p, np.nan)
    per: list[dict[str, Any]] = []
    for part, fit_rows, held in _per_part(parts):
        t = fit_temperature(p[fit_rows], y[fit_rows])["temperature"]
        out_p[held] = apply_temperature(p[held], t)
        per.append(
            {"part": part, "temperature": t, "n": int(held.sum()), "ece": ece(out_p[held], y[held])}
        )
    before = calibration_summary(p, y, groups=g, n_boot=n_boot, seed=seed)
    after = calibration_summary(out_p, y, groups=g, n_boot=n_boot, seed=seed)
    whole = fit_temperature(p, y)["temperature"]
    in_sample = calibration_summary(
        apply_temperature(p, whole), y, groups=g, n_boot=n_boot, seed=seed
    )
    return {
        "before": {k: before[k] for k in _KEEP},
        "after": {k: after[k] for k in _KEEP},
        "per_part": per,
        "part_mean": _mean_ci([r["ece"] for r in per]),
        "in_sample_after": {k: in_sample[k] for k in _KEEP},
        "in_sample_temperature": whole,
        "calibrated": out_p,
    }


def crossfit_operating_point(
    probs: np.ndarray,
    labels: np.ndarray,
    positive_index: int,
    rule: str,
    target: float | None,
    groups: np.ndarray,
    parts: np.ndarray,
    *,
    temperature: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The threshold chosen on all parts but one and applied to that one, for every part;
    sensitivity and specificity of the pooled held-out decisions with patient-bootstrap CIs,
    per part, and the in-sample point (chosen and scored on everything, after one temperature
    fitted on everything when `temperature`) under ``in_sample``. With `temperature` each part's
    temperature is fitted on the other parts too, before its threshold is chosen there. Parts
    whose other parts lack a positive or a negative row are left out and counted."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    g = np.asarray(groups)
    pos = y == positive_index
    called = np.zeros(len(y), dtype=bool)
    scored = np.zeros(len(y), dtype=bool)
    per: list[dict[str, Any]] = []
    for part, fit_rows, held in _per_part(parts):
        if pos[fit_rows].all() or not pos[fit_rows].any():
            per.append({"part": part, "threshold": None, "n": int(held.sum()), "left_out": True})
            continue
        q = p
        if temperature:
            q = apply_temperature(p, fit_temperature(p[fit_rows], y[fit_rows])["temperature"])
        scores = q[:, positive_index]
        t = choose_threshold(scores[fit_rows], pos[fit_rows], rule, target)
        called[held] = scores[held] >= t
        scored[held] = True
        hp, hn = pos & held, ~pos & held
        per.append(
            {
                "part": part,
                "threshold": t,
                "n": int(held.sum()),
                "sensitivity": float(called[hp].mean()) if hp.any() else None,
                "specificity": float((~called[hn]).mean()) if hn.any() else None,
            }
        )
    if not scored.any():
        raise ConfigError(
            "no part could be cross-fitted: every other-parts set lacks a positive or a "
            "negative row"
        )
    r = rates_at(called[scored], pos[scored], g[scored], n_boot=n_boot, seed=seed)
    whole = apply_temperature(p, fit_temperature(p, y)["temperature"]) if temperature else p
    in_sample = operating_point(
        whole, y, positive_index, rule, target, groups=g, n_boot=n_boot, seed=seed
    )
    return {
        "rule": rule,
        "target": target,
        **r,
        "per_part": per,
        "n_left_out": int((~scored).sum()),
        "in_sample": {
            k: in_sample[k]
            for k in (
                "threshold",
                "argmax_sensitivity",
                "argmax_specificity",
                "sensitivity",
                "sensitivity_ci_low",
                "sensitivity_ci_high",
                "specificity",
                "specificity_ci_low",
                "specificity_ci_high",
            )
        },
    }
