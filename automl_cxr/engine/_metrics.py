"""Classification metrics, fold summaries, bootstrap intervals and paired tests.

Inputs are ``y_true`` (``N`` integer class indices ``0..C-1``), ``y_prob`` (``N x C`` class
probabilities or scores; row ``i`` column ``k`` is the score of ``classes[k]``) and ``classes``
(the ``C`` labels). The predicted class is the arg-max of each row (first column on ties).
``TP_k, FN_k, FP_k, TN_k`` are the one-vs-rest counts of class ``k`` from the confusion matrix.

Metric names
------------
``accuracy``
    Fraction of images whose predicted class is the true class: ``trace(CM) / N``.
``balanced_accuracy``
    Mean sensitivity (recall) over the classes present in ``y_true`` (scikit-learn's
    ``balanced_accuracy_score``).
``macro_f1``
    Unweighted mean over classes of ``F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k)``, taken over the
    classes that occur in ``y_true`` or in the predictions (scikit-learn's
    ``f1_score(average="macro")``); a class that is predicted but absent from ``y_true`` counts
    with ``F1 = 0``.
``auc``
    ROC-AUC. Two classes: the usual binary AUC of ``classes[1]`` scored by ``y_prob[:, 1]``.
    More classes: the unweighted mean of the one-vs-rest AUCs of the classes present in ``y_true``
    (equal to ``roc_auc_score(..., multi_class="ovr", average="macro")`` when every class is
    present). ``NaN`` when fewer than two classes are present in ``y_true``.
``covid_sensitivity``, ``covid_specificity``, ``covid_accuracy``
    The paper's numbers for the positive class (argument ``positive``, ``"covid"`` by default)
    against all other classes: ``TP / (TP + FN)``, ``TN / (TN + FP)`` and the two-class
    accuracy ``(TP + TN) / N`` (the paper's "2-class accuracy": a multi-class prediction
    collapsed to positive vs rest, which is how its 96.78 % headline is defined). The keys
    always carry the literal prefix ``covid_`` whatever ``positive`` is, and are present only when
    ``positive`` is one of ``classes``.
``per_class[label]``
    For each class ``k`` (one-vs-rest): ``sensitivity = TP/(TP+FN)``, ``specificity =
    TN/(TN+FP)``, ``precision = TP/(TP+FP)``, ``f1 = 2TP/(2TP+FP+FN)``, ``auc`` (ROC-AUC of
    ``y_prob[:, k]`` for class ``k`` vs rest) and ``support = TP + FN`` (images of that class).
    A value whose denominator is zero, or an AUC without both positives and negatives, is ``NaN``.
``sensitivity_<label>``, ``specificity_<label>``
    ``per_class[label]["sensitivity"]`` and ``["specificity"]`` flattened into scalar keys by
    :func:`scalar_metrics`, e.g. ``sensitivity_covid``, ``specificity_normal``.
``confusion_matrix``
    ``C x C`` counts, rows = true class, columns = predicted class, in ``classes`` order.
``n``
    Number of images.

A class absent from ``y_true`` never makes these functions fail: its sensitivity, support-based
values and AUC are ``NaN`` and it is left out of ``balanced_accuracy`` and ``auc``. All results are
plain Python ``float``/``int``/``list``/``dict`` values; ``NaN`` is kept as ``float("nan")``
(``json.dumps`` writes it as ``NaN``).

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
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import roc_curve

from automl_cxr.errors import ConfigError

__all__ = [
    "PER_CLASS_SCALARS",
    "SCALAR_METRICS",
    "WORST_FOLD_METRICS",
    "fold_metric",
    "available_metrics",
    "bootstrap_metrics",
    "bootstrap_weights",
    "group_bootstrap_weights",
    "metric_figure",
    "compute_metrics",
    "corrected_paired_ttest",
    "flatten_per_class",
    "roc_curves",
    "scalar_metrics",
    "summarize_folds",
]

SCALAR_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auc",
    "covid_sensitivity",
    "covid_specificity",
    "covid_accuracy",
)
"""Scalar metric names (the ``covid_*`` ones only exist when the positive class does)."""

WORST_FOLD_METRICS: dict[str, str] = {"worst_site_balanced_accuracy": "balanced_accuracy"}
"""Summary-only metrics: the minimum over validation folds of a fold metric. Under `--cv site`
every fold holds out whole sites, so this is the balanced accuracy of the worst held-out group
of hospitals (a fold holding one class only, such as NIH's non-COVID films, scores the recall
of that class, as `balanced_accuracy` does); under `--cv patient` it is the worst fold. A fold
reports its own `balanced_accuracy` as this metric's intermediate value."""

PER_CLASS_SCALARS: tuple[str, ...] = ("sensitivity", "specificity")
"""Per-class values flattened into ``<name>_<label>`` keys by :func:`flatten_per_class`."""


def available_metrics(classes: Sequence[str], positive: str | None) -> list[str]:
    """Every scalar metric a dataset with these classes gets (what `--metric` may name): the
    class-free ones, the ``covid_*`` ones when the positive class is among the classes, and
    ``sensitivity_<class>`` / ``specificity_<class>`` for each class."""
    names = [m for m in SCALAR_METRICS if not m.startswith("covid_")]
    if positive is not None and positive in classes:
        names += [m for m in SCALAR_METRICS if m.startswith("covid_")]
    names += [f"{p}_{c}" for p in PER_CLASS_SCALARS for c in classes]
    return names + list(WORST_FOLD_METRICS)


def fold_metric(metric: str) -> str:
    """The per-fold metric behind `metric` (itself, or the base of a worst-fold metric)."""
    return WORST_FOLD_METRICS.get(metric, metric)


_NAN = float("nan")
_BOOT_CHUNK_CELLS = 4_000_000  # resamples x images per vectorised chunk (~32 MB of float64)


# ----------------------------------------------------------------------------- point metrics


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    *,
    positive: str | None = "covid",
) -> dict[str, Any]:
    """All metrics of one set of predictions (see the module docstring for definitions).

    ``y_prob`` may also be a 1-D array of ``classes[1]`` probabilities when there are 2 classes.

    Returns:
        ``{"accuracy", "balanced_accuracy", "macro_f1", "auc", ["covid_sensitivity",
        "covid_specificity", "covid_accuracy",] "per_class": {label: {"sensitivity",
        "specificity", "precision", "f1", "auc", "support"}}, "confusion_matrix": [[int]],
        "classes": [str], "n": int}``.
    """
    yt, yp, cls = _validate_predictions(y_true, y_prob, classes)
    n_cls = len(cls)
    # The bootstrap's vectorised evaluator with every image weighted once: the same numbers as
    # scikit-learn's confusion_matrix, balanced_accuracy_score, f1_score(average="macro") and
    # roc_auc_score (tests/test_metrics.py checks each), ~20x faster than calling them, which
    # matters because a search evaluates every epoch of every fold.
    evaluator = _WeightedEvaluator(yt, yp)
    ones = np.ones((1, yt.size))
    cm = evaluator.confusion(ones)[0].round().astype(np.int64)
    point = evaluator.scalars(ones, cls, None)
    bal_acc = float(point["balanced_accuracy"][0])
    macro_f1 = float(point["macro_f1"][0])
    auc = float(point["auc"][0])  # binary: classes[1]; else the mean over present classes
    class_auc = [float(evaluator.class_auc(ones, k)[0]) for k in range(n_cls)]

    per_class: dict[str, dict[str, float | int]] = {}
    n = int(cm.sum())
    for k, label in enumerate(cls):
        tp = int(cm[k, k])
        fn = int(cm[k].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = n - tp - fn - fp
        per_class[label] = {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "auc": class_auc[k],
            "support": tp + fn,
        }
    out: dict[str, Any] = {
        "accuracy": float(np.trace(cm) / n),
        "balanced_accuracy": bal_acc,
        "macro_f1": macro_f1,
        "auc": auc,
    }
    if positive is not None and positive in per_class:
        out["covid_sensitivity"] = per_class[positive]["sensitivity"]
        out["covid_specificity"] = per_class[positive]["specificity"]
        k = cls.index(positive)
        out["covid_accuracy"] = float(
            (n - int(cm[k].sum()) - int(cm[:, k].sum()) + 2 * int(cm[k, k])) / n
        )
    out["per_class"] = per_class
    out["confusion_matrix"] = cm.astype(int).tolist()
    out["classes"] = list(cls)
    out["n"] = n
    return out


def flatten_per_class(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{"sensitivity_<label>": ..., "specificity_<label>": ...}`` from ``per_class``."""
    per_class = metrics.get("per_class") or {}
    return {
        f"{name}_{label}": float(values[name])
        for label, values in per_class.items()
        for name in PER_CLASS_SCALARS
        if name in values
    }


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics of a :func:`compute_metrics` result, per-class ones flattened.

    Keys: those of :data:`SCALAR_METRICS` that are present, then ``sensitivity_<label>`` /
    ``specificity_<label>``. Already-flattened keys in ``metrics`` are kept as well, so this also
    accepts the output of an earlier call.
    """
    out = {k: float(metrics[k]) for k in SCALAR_METRICS if k in metrics}
    for key, value in metrics.items():
        if key.startswith(tuple(f"{p}_" for p in PER_CLASS_SCALARS)) and _is_number(value):
            out[key] = float(value)
    out.update(flatten_per_class(metrics))
    return out


def roc_curves(
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    max_points: int = 50,
) -> dict[str, dict[str, Any]]:
    """One-vs-rest ROC curve of every class, at most ``max_points`` points each.

    Returns ``{label: {"fpr": [float], "tpr": [float], "auc": float}}``. Curves are thinned to
    evenly spaced vertices of scikit-learn's ``roc_curve`` (first and last kept) and rounded to 4
    decimals, small enough for a study's user attributes. ``auc`` is computed on the full curve. A
    class without positives or without negatives in ``y_true`` gets empty lists and ``NaN``.
    """
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ConfigError(f"max_points must be an integer >= 2, but got max_points={max_points!r}")
    yt, yp, cls = _validate_predictions(y_true, y_prob, classes)
    out: dict[str, dict[str, Any]] = {}
    for k, label in enumerate(cls):
        pos = yt == k
        if pos.all() or not pos.any():
            out[label] = {"fpr": [], "tpr": [], "auc": _NAN}
            continue
        fpr, tpr, _ = roc_curve(pos, yp[:, k])
        area = float(area_under_curve(fpr, tpr))  # = roc_auc_score, without a second pass
        if fpr.size > max_points:
            keep = np.unique(np.round(np.linspace(0, fpr.size - 1, max_points)).astype(int))
            fpr, tpr = fpr[keep], tpr[keep]
        out[label] = {
            "fpr": [round(float(v), 4) for v in fpr],
            "tpr": [round(float(v), 4) for v in tpr],
            "auc": area,
        }
    return out


# ----------------------------------------------------------------------------- across folds


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
        values = np.array([f.get(name, _NAN) for f in flat], dtype=float)
        summary[name] = _t_summary(values, confidence, ratio)
    for worst, base in WORST_FOLD_METRICS.items():
        if base in summary:
            vals = np.asarray(summary[base]["folds"], dtype=float)
            ok = vals[~np.isnan(vals)]
            low = float(ok.min()) if ok.size else _NAN
            summary[worst] = {
                "mean": low,
                "std": _NAN,
                "ci_low": _NAN,
                "ci_high": _NAN,
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
    mean_diff = float(diff.mean()) if n else _NAN
    if n < 2:
        t, p = _NAN, _NAN
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


# ----------------------------------------------------------------------------- bootstrap


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
    yt, yp, cls = _validate_predictions(y_true, y_prob, classes)
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

    evaluator = _WeightedEvaluator(yt, yp)
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
            lo = hi = _NAN
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


class _WeightedEvaluator:
    """Scalar metrics for many integer weightings of one prediction set at once."""

    def __init__(self, y_true: np.ndarray, y_prob: np.ndarray) -> None:
        n, n_cls = y_prob.shape
        self.n_cls = n_cls
        y_pred = y_prob.argmax(axis=1)
        cell = y_true * n_cls + y_pred
        self.cell_onehot = np.zeros((n, n_cls * n_cls))
        self.cell_onehot[np.arange(n), cell] = 1.0
        # Per class: order by score and start of each run of tied scores.
        self.auc_prep = []
        for k in range(n_cls):
            order = np.argsort(y_prob[:, k], kind="stable")
            s = y_prob[order, k]
            starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
            self.auc_prep.append((order, (y_true[order] == k).astype(float), starts))

    def confusion(self, w: np.ndarray) -> np.ndarray:
        return (w @ self.cell_onehot).reshape(-1, self.n_cls, self.n_cls)

    def class_auc(self, w: np.ndarray, k: int) -> np.ndarray:
        """Weighted one-vs-rest AUC of class ``k`` for each row of weights (NaN if undefined)."""
        order, is_pos, starts = self.auc_prep[k]
        ws = w[:, order]
        pos = np.add.reduceat(ws * is_pos, starts, axis=1)
        neg = np.add.reduceat(ws * (1.0 - is_pos), starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((n_pos > 0) & (n_neg > 0), num / (n_pos * n_neg), np.nan)

    def scalars(
        self, w: np.ndarray, classes: list[str], pos_idx: int | None
    ) -> dict[str, np.ndarray]:
        cm = self.confusion(w)
        total = cm.sum(axis=(1, 2))
        tp = np.diagonal(cm, axis1=1, axis2=2)
        support = cm.sum(axis=2)
        predicted = cm.sum(axis=1)
        fn, fp = support - tp, predicted - tp
        tn = total[:, None] - tp - fn - fp
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
            sens = np.where(support > 0, tp / support, np.nan)
            spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
            f1_den = 2 * tp + fp + fn
            f1 = np.where(f1_den > 0, 2 * tp / f1_den, np.nan)
            out = {
                "accuracy": np.trace(cm, axis1=1, axis2=2) / total,
                "balanced_accuracy": np.nanmean(sens, axis=1),
                "macro_f1": np.nanmean(f1, axis=1),
            }
            if self.n_cls == 2:
                out["auc"] = self.class_auc(w, 1)
            else:
                aucs = np.stack([self.class_auc(w, k) for k in range(self.n_cls)], axis=1)
                n_present = (support > 0).sum(axis=1)
                out["auc"] = np.where(n_present >= 2, np.nanmean(aucs, axis=1), np.nan)
        if pos_idx is not None:
            out["covid_sensitivity"] = sens[:, pos_idx]
            out["covid_specificity"] = spec[:, pos_idx]
            tp_p = tp[:, pos_idx]
            out["covid_accuracy"] = (
                total - support[:, pos_idx] - predicted[:, pos_idx] + 2 * tp_p
            ) / total
        for k, label in enumerate(classes):
            out[f"sensitivity_{label}"] = sens[:, k]
            out[f"specificity_{label}"] = spec[:, k]
        return out


# ----------------------------------------------------------------------------- internals


def _validate_predictions(
    y_true: Any, y_prob: Any, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    cls = [str(c) for c in classes]
    n_cls = len(cls)
    if n_cls < 2:
        raise ConfigError(f"classes must hold at least 2 labels, but got classes={cls!r}")
    if len(set(cls)) != n_cls:
        raise ConfigError(f"classes must be distinct, but got classes={cls!r}")
    yt = np.asarray(y_true)
    if yt.ndim != 1:
        raise ConfigError(f"y_true must be one-dimensional, but got shape {yt.shape}")
    if yt.size == 0:
        raise ConfigError("y_true must not be empty, but got 0 samples")
    is_int = np.issubdtype(yt.dtype, np.integer) or np.issubdtype(yt.dtype, np.bool_)
    is_whole_float = np.issubdtype(yt.dtype, np.floating) and bool(np.all(yt == np.round(yt)))
    if not (is_int or is_whole_float):
        raise ConfigError(
            f"y_true must hold integer class indices 0..{n_cls - 1}, but got dtype {yt.dtype}"
        )
    yt = yt.astype(np.int64)
    bad = yt[(yt < 0) | (yt >= n_cls)]
    if bad.size:
        raise ConfigError(
            f"y_true must hold class indices in 0..{n_cls - 1} (len(classes)={n_cls}), but got "
            f"{sorted(set(bad.tolist()))[:10]}"
        )
    yp = np.asarray(y_prob, dtype=float)
    if yp.ndim == 1 and n_cls == 2:
        yp = np.column_stack([1.0 - yp, yp])
    if yp.ndim != 2 or yp.shape != (yt.size, n_cls):
        raise ConfigError(
            f"y_prob must have shape (n_samples, n_classes) = ({yt.size}, {n_cls}), but got "
            f"shape {yp.shape}"
        )
    if not np.all(np.isfinite(yp)):
        raise ConfigError(f"y_prob must be finite, but got {int((~np.isfinite(yp)).sum())} NaN/inf")
    return yt, yp, cls


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else _NAN


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


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
        if not _is_number(given) or not 0 < given < math.inf:
            raise ConfigError(
                f"test_train_ratio must be a positive number, but got test_train_ratio={given!r}"
            )
        return float(given)
    sizes = [(m.get("n_val"), m.get("n_train")) for m in fold_metrics]
    if all(_is_number(v) and _is_number(t) and v > 0 and t > 0 for v, t in sizes):
        return float(np.mean([v / t for v, t in sizes]))
    return None


def _t_summary(values: np.ndarray, confidence: float, ratio: float | None) -> dict[str, Any]:
    valid = values[~np.isnan(values)]
    n = int(valid.size)
    folds = [float(v) for v in values]
    if n == 0:
        mean = std = lo = hi = _NAN
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
