"""Statistical inference over the metrics of `_metrics.py`: fold summaries with confidence
intervals, paired tests between configurations, (patient-)bootstrap intervals.

:func:`summarize_folds` gives mean, ``std`` (``ddof=1``) and a confidence interval of each scalar
metric over cross-validation folds. K-fold training sets overlap (by 1 - 1/(K-1) of their
images), so fold scores are not independent and the plain t interval is too narrow: when the
fold sizes are known the interval uses the corrected resampled t of Nadeau & Bengio (2003,
"Inference for the generalization error"), whose variance is ``std**2 * (1/J + n_val/n_train)``
for ``J`` folds instead of ``std**2 / J`` (``ci_method`` in the summary says which was used).
:func:`corrected_paired_ttest` is the same correction for comparing two configurations on the
same folds (with no training overlap it is the plain paired t-test).
:func:`bootstrap_metrics` gives percentile bootstrap intervals over images or patients (for
external sets, which are one sample evaluated once).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from automl_cxr._numbers import is_number
from automl_cxr.engine._metrics import (
    SCALAR_METRICS,
    WORST_FOLD_METRICS,
    WeightedEvaluator,
    compute_metrics,
    scalar_metrics,
    validate_predictions,
)
from automl_cxr.errors import ConfigError

__all__ = [
    "bootstrap_metrics",
    "bootstrap_weights",
    "corrected_paired_ttest",
    "group_bootstrap_weights",
    "metric_figure",
    "summarize_folds",
]

_BOOT_CHUNK_CELLS = 4_000_000  # resamples x images per vectorised chunk (~32 MB of float64)


def summarize_folds(
    fold_metrics: Sequence[Mapping[str, Any]],
    confidence: float = 0.95,
    *,
    test_train_ratio: float | None = None,
) -> dict[str, Any]:
    """Mean, spread and Student-t confidence interval of each scalar metric over folds.

    Each element of ``fold_metrics`` is a :func:`compute_metrics` result (or a flat dict of
    scalars). ``NaN`` folds are ignored for a metric and counted in ``n_nan``. With ``n`` valid
    folds the interval is ``mean +- t_{(1+confidence)/2, n-1} * se``: with the corrected
    resampled t (``ci_method="corrected_t"``, Nadeau & Bengio 2003) ``se = std * sqrt(1/n +
    n_val/n_train)``, where ``n_val/n_train`` is ``test_train_ratio`` or, when every fold carries
    ``n_train`` and ``n_val`` (as :func:`automl_cxr.engine.run_trial`'s folds do), the mean of
    their ratios; without fold sizes it is the plain ``std / sqrt(n)`` (``ci_method="t"``, which
    assumes independent folds and is too narrow for cross-validation). With a single valid fold
    ``std`` is 0 and the interval is ``[value, value]`` (no spread can be estimated from one
    fold); with none, everything is NaN.

    Returns:
        ``{"n_folds": int, "confidence": float, "ci_method": "corrected_t" | "t",
        "test_train_ratio": float | None, "metrics": {name: {"mean", "std", "ci_low", "ci_high",
        "n", "n_nan", "folds": [float]}}, "confusion_matrix": [[int]] | None, "classes": [str] |
        None}``; ``confusion_matrix`` is the sum over folds (``None`` unless every fold has one).
    """
    if len(fold_metrics) == 0:
        raise ConfigError("fold_metrics must hold at least one fold, but got 0")
    _check_confidence(confidence)
    ratio = _test_train_ratio(fold_metrics, test_train_ratio)
    flat = [scalar_metrics(m) for m in fold_metrics]
    names: list[str] = [k for k in SCALAR_METRICS if any(k in f for f in flat)]
    for f in flat:
        names += [k for k in f if k not in names]
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        values = np.array([f.get(name, math.nan) for f in flat], dtype=float)
        summary[name] = _t_summary(values, confidence, ratio)
    for worst, base in WORST_FOLD_METRICS.items():
        if base in summary:
            vals = np.asarray(summary[base]["folds"], dtype=float)
            ok = vals[~np.isnan(vals)]
            low = float(ok.min()) if ok.size else math.nan
            summary[worst] = {
                "mean": low,
                "std": math.nan,
                "ci_low": math.nan,
                "ci_high": math.nan,
                "n": int(ok.size),
                "n_nan": int(vals.size - ok.size),
                "folds": [float(v) for v in vals],
            }

    cms = [m.get("confusion_matrix") for m in fold_metrics]
    total_cm: list[list[int]] | None = None
    if all(cm is not None for cm in cms):
        arrays = [np.asarray(cm, dtype=np.int64) for cm in cms]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ConfigError(
                f"all folds must have confusion matrices of one shape, but got {sorted(shapes)}"
            )
        total_cm = np.sum(arrays, axis=0).astype(int).tolist()
    class_lists = [tuple(m["classes"]) for m in fold_metrics if "classes" in m]
    classes = list(class_lists[0]) if class_lists and len(set(class_lists)) == 1 else None
    return {
        "n_folds": len(fold_metrics),
        "confidence": float(confidence),
        "ci_method": "t" if ratio is None else "corrected_t",
        "test_train_ratio": ratio,
        "metrics": summary,
        "confusion_matrix": total_cm,
        "classes": classes,
    }


def corrected_paired_ttest(
    a_folds: Sequence[float] | np.ndarray,
    b_folds: Sequence[float] | np.ndarray,
    n_train: float | Sequence[float],
    n_val: float | Sequence[float],
    *,
    alternative: str = "two-sided",
) -> dict[str, float | int | str]:
    """Corrected resampled paired t-test (Nadeau & Bengio 2003) of per-fold scores a against b.

    ``a`` and ``b`` must come from the same folds (the same training/validation members).
    With ``d = a - b`` over the ``J`` folds where neither is NaN, ``t = mean(d) / sqrt((1/J +
    n_val/n_train) * var(d))`` (``var`` with ``ddof=1``) on ``J - 1`` degrees of freedom:
    the ``n_val/n_train`` term accounts for the overlap of the folds' training sets that the
    plain paired t-test (``scipy.stats.ttest_rel``, the limit ``n_val/n_train -> 0``) ignores.
    ``n_train``/``n_val`` are the training/validation sizes, one number or one per fold (their
    mean ratio is used).

    Returns ``{"mean_diff", "t", "p_value", "n", "test_train_ratio", "method":
    "corrected_t"}``; NaN ``t``/``p_value`` with fewer than 2 pairs, ``t = 0, p = 1`` when every
    difference is 0.
    """
    a, b = _paired_folds(a_folds, b_folds, alternative)
    ntr = np.asarray(n_train, dtype=float).ravel()
    nva = np.asarray(n_val, dtype=float).ravel()
    for name, arr in (("n_train", ntr), ("n_val", nva)):
        if arr.size not in (1, a.size) or not np.all(arr > 0) or not np.all(np.isfinite(arr)):
            raise ConfigError(
                f"{name} must be a positive size or one per fold ({a.size}), but got "
                f"{name}={arr.tolist()}"
            )
    ratio = float(np.mean(np.broadcast_to(nva, a.shape) / np.broadcast_to(ntr, a.shape)))
    ok = ~(np.isnan(a) | np.isnan(b))
    diff = a[ok] - b[ok]
    n = int(diff.size)
    mean_diff = float(diff.mean()) if n else math.nan
    if n < 2:
        t, p = math.nan, math.nan
    elif np.all(diff == 0):
        t, p = 0.0, 1.0
    else:
        se = math.sqrt((1.0 / n + ratio) * float(diff.var(ddof=1)))
        t = mean_diff / se if se > 0 else math.copysign(math.inf, mean_diff)
        if alternative == "two-sided":
            p = float(2 * stats.t.sf(abs(t), n - 1))
        elif alternative == "greater":
            p = float(stats.t.sf(t, n - 1))
        else:
            p = float(stats.t.cdf(t, n - 1))
    return {
        "mean_diff": mean_diff,
        "t": float(t),
        "p_value": p,
        "n": n,
        "test_train_ratio": ratio,
        "method": "corrected_t",
    }


def metric_figure(
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    metric: str,
    *,
    positive: str | None = "covid",
    groups: Sequence[str] | np.ndarray | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """One metric as a figure to quote: its estimate and (patient-)bootstrap 95 % interval,
    with every scalar metric's estimate and the number of resampled units
    (:func:`bootstrap_metrics`)."""
    b = bootstrap_metrics(y_true, y_prob, classes, positive=positive, groups=groups, n_boot=n_boot)
    m = b["metrics"].get(metric) or {}
    return {
        "estimate": m.get("estimate"),
        "ci_low": m.get("ci_low"),
        "ci_high": m.get("ci_high"),
        "metrics": {k: v["estimate"] for k, v in b["metrics"].items()},
        "n_units": b["n_units"],
    }


def bootstrap_weights(
    unit_of_row: np.ndarray, n_units: int, n_boot: int, seed: int = 0, *, chunk: int | None = None
) -> Iterator[np.ndarray]:
    """Row weights of a cluster bootstrap, `chunk` replicates (rows of a (chunk, N) array) at a
    time: each replicate draws `n_units` units (patients, or images) with replacement, and a
    row's weight is how often its unit was drawn. One seeded stream whatever the chunking."""
    rng = np.random.default_rng(seed)
    chunk = n_boot if chunk is None else chunk
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_units, size=(b, n_units))
        offsets = (np.arange(b) * n_units)[:, None]
        unit_w = np.bincount((draws + offsets).ravel(), minlength=b * n_units).reshape(b, n_units)
        yield unit_w[:, unit_of_row].astype(float)


def group_bootstrap_weights(groups: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, N) row weights of a patient (cluster) bootstrap over `groups`: each replicate
    draws as many groups as there are, with replacement (:func:`bootstrap_weights`)."""
    g = np.asarray(groups)
    _, inv = np.unique(g.astype(str) if g.dtype == object else g, return_inverse=True)
    return next(bootstrap_weights(inv.ravel(), int(inv.max()) + 1, n_boot, seed))


def bootstrap_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    positive: str | None = "covid",
    groups: Sequence[str] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Point estimates and percentile bootstrap intervals of every scalar metric.

    Resamples images with replacement, or, when ``groups`` (patient ids) is given, patients with
    replacement (all images of a drawn patient, as often as it was drawn). Resamples where a
    metric is undefined (e.g. no positive image drawn) are left out of its interval and counted in
    ``n_valid``. Vectorised: resampling becomes integer image weights, confusion matrices a matrix
    product, and AUCs a weighted rank statistic (ties count 1/2), so ``n_boot=1000`` on 2,000
    images takes well under a second. Deterministic for a ``seed``.

    Returns:
        ``{"n_boot": int, "confidence": float, "unit": "image" | "patient", "n_units": int,
        "metrics": {name: {"estimate", "ci_low", "ci_high", "n_valid"}}}`` with ``name`` over
        :data:`SCALAR_METRICS` (those present) and the flattened per-class
        ``sensitivity_<label>`` / ``specificity_<label>``; ``estimate`` is the value on the data
        as given (:func:`compute_metrics`).
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer, but got n_boot={n_boot!r}")
    _check_confidence(confidence)
    yt, yp, cls = validate_predictions(y_true, y_prob, classes)
    n = yt.size
    if groups is None:
        unit_of_image = np.arange(n)
        n_units = n
    else:
        g = np.asarray(groups)
        if g.ndim != 1 or g.size != n:
            raise ConfigError(
                f"groups must have one entry per image ({n}), but got shape {g.shape}"
            )
        _, unit_of_image = np.unique(g.astype(str) if g.dtype == object else g, return_inverse=True)
        n_units = int(unit_of_image.max()) + 1

    point = compute_metrics(yt, yp, cls, positive=positive)
    estimates = scalar_metrics(point)
    pos_idx = cls.index(positive) if positive is not None and positive in cls else None

    evaluator = WeightedEvaluator(yt, yp)
    chunk = max(1, _BOOT_CHUNK_CELLS // max(n, n_units))
    parts = [
        evaluator.scalars(w, cls, pos_idx)
        for w in bootstrap_weights(unit_of_image, n_units, n_boot, seed, chunk=chunk)
    ]
    samples = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    lo_q, hi_q = 50 * (1 - confidence), 50 * (1 + confidence)
    out_metrics: dict[str, dict[str, float | int]] = {}
    for name, est in estimates.items():
        vals = samples[name]
        vals = vals[~np.isnan(vals)]
        if vals.size:
            lo, hi = np.percentile(vals, [lo_q, hi_q])
            lo, hi = float(lo), float(hi)
        else:
            lo = hi = math.nan
        out_metrics[name] = {
            "estimate": float(est),
            "ci_low": lo,
            "ci_high": hi,
            "n_valid": int(vals.size),
        }
    return {
        "n_boot": int(n_boot),
        "confidence": float(confidence),
        "unit": "image" if groups is None else "patient",
        "n_units": int(n_units),
        "metrics": out_metrics,
    }


def _check_confidence(confidence: Any) -> None:
    if not isinstance(confidence, float | int) or not 0.0 < float(confidence) < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), but got confidence={confidence!r}")


def _paired_folds(a_folds: Any, b_folds: Any, alternative: str) -> tuple[np.ndarray, np.ndarray]:
    """Two per-fold score vectors of the same length, and a valid `alternative`."""
    a = np.asarray(a_folds, dtype=float).ravel()
    b = np.asarray(b_folds, dtype=float).ravel()
    if a.size != b.size:
        raise ConfigError(
            f"a_folds and b_folds must have the same length, but got {a.size} and {b.size}"
        )
    _check_alternative(alternative)
    return a, b


def _check_alternative(alternative: Any) -> None:
    if alternative not in ("two-sided", "less", "greater"):
        raise ConfigError(
            "alternative must be one of 'two-sided', 'less', 'greater', but got "
            f"alternative={alternative!r}"
        )


def _test_train_ratio(
    fold_metrics: Sequence[Mapping[str, Any]], given: float | None
) -> float | None:
    """n_val / n_train for the corrected t: as given, else from the folds' sizes, else None."""
    if given is not None:
        if not is_number(given) or not 0 < given < math.inf:
            raise ConfigError(
                f"test_train_ratio must be a positive number, but got test_train_ratio={given!r}"
            )
        return float(given)
    sizes = [(m.get("n_val"), m.get("n_train")) for m in fold_metrics]
    if all(is_number(v) and is_number(t) and v > 0 and t > 0 for v, t in sizes):
        return float(np.mean([v / t for v, t in sizes]))
    return None


def _t_summary(values: np.ndarray, confidence: float, ratio: float | None) -> dict[str, Any]:
    valid = values[~np.isnan(values)]
    n = int(valid.size)
    folds = [float(v) for v in values]
    if n == 0:
        mean = std = lo = hi = math.nan
    elif n == 1:
        mean, std = float(valid[0]), 0.0
        lo = hi = mean
    else:
        mean, std = float(valid.mean()), float(valid.std(ddof=1))
        if std == 0.0:
            lo = hi = mean
        else:
            factor = 1.0 / n + (ratio if ratio is not None else 0.0)
            lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=std * math.sqrt(factor))
            lo, hi = float(lo), float(hi)
    return {
        "mean": mean,
        "std": std,
        "ci_low": lo,
        "ci_high": hi,
        "n": n,
        "n_nan": int(values.size - n),
        "folds": folds,
    }
