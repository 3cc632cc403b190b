"""Classification metrics of one set of predictions (point estimates).

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

Intervals and tests over these metrics are in `_inference.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import roc_curve

from automl_cxr._numbers import is_number
from automl_cxr.errors import ConfigError

__all__ = [
    "PER_CLASS_SCALARS",
    "SCALAR_METRICS",
    "WORST_FOLD_METRICS",
    "WeightedEvaluator",
    "available_metrics",
    "CONFUSION_METRICS",
    "compute_metrics",
    "confusion_scalar",
    "confusion_scalars",
    "flatten_per_class",
    "fold_metric",
    "roc_curves",
    "scalar_metrics",
    "validate_predictions",
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
    yt, yp, cls = validate_predictions(y_true, y_prob, classes)
    n_cls = len(cls)
    # The bootstrap's vectorised evaluator with every image weighted once: the same numbers as
    # scikit-learn's confusion_matrix, balanced_accuracy_score, f1_score(average="macro") and
    # roc_auc_score (tests/test_metrics.py checks each), ~20x faster than calling them, which
    # matters because a search evaluates every epoch of every fold.
    evaluator = WeightedEvaluator(yt, yp)
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
        if key.startswith(tuple(f"{p}_" for p in PER_CLASS_SCALARS)) and is_number(value):
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
    yt, yp, cls = validate_predictions(y_true, y_prob, classes)
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


# ----------------------------------------------------------------------------- bootstrap


class WeightedEvaluator:
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

    def auc(self, w: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
        """The study's `auc` for each row of weights: class 1's for two classes, else the
        mean one-vs-rest AUC over the classes present (NaN with fewer than two)."""
        if self.n_cls == 2:
            return self.class_auc(w, 1)
        if support is None:
            support = self.confusion(w).sum(axis=2)
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
            aucs = np.stack([self.class_auc(w, k) for k in range(self.n_cls)], axis=1)
            n_present = (support > 0).sum(axis=1)
            return np.where(n_present >= 2, np.nanmean(aucs, axis=1), np.nan)

    def scalars(
        self, w: np.ndarray, classes: list[str], pos_idx: int | None
    ) -> dict[str, np.ndarray]:
        cm = self.confusion(w)
        out = confusion_scalars(cm, classes, pos_idx)
        head = {k: out.pop(k) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
        return {**head, "auc": self.auc(w, cm.sum(axis=2)), **out}


class _Counts:
    """One-vs-rest counts of a batch of confusion matrices (B, C, C), per class (B, C); each
    rate is computed on first use and kept (several metrics share it)."""

    def __init__(self, cm: np.ndarray) -> None:
        self.total = cm.sum(axis=(1, 2))  # (B,)
        self.correct = np.trace(cm, axis1=1, axis2=2)  # (B,)
        self.tp = np.diagonal(cm, axis1=1, axis2=2)
        self.support = cm.sum(axis=2)  # TP + FN: images of the class
        self.predicted = cm.sum(axis=1)  # TP + FP: images called the class

    @cached_property
    def sensitivity(self) -> np.ndarray:
        return np.where(self.support > 0, self.tp / self.support, np.nan)

    @cached_property
    def specificity(self) -> np.ndarray:
        fp = self.predicted - self.tp
        tn = self.total[:, None] - self.support - fp
        return np.where(tn + fp > 0, tn / (tn + fp), np.nan)

    @cached_property
    def f1(self) -> np.ndarray:
        den = self.support + self.predicted  # 2 TP + FP + FN
        return np.where(den > 0, 2 * self.tp / den, np.nan)


_CONFUSION: dict[str, Callable[[_Counts, int], np.ndarray]] = {
    "accuracy": lambda c, k: c.correct / c.total,
    "balanced_accuracy": lambda c, k: _mean_defined(c.sensitivity),
    "macro_f1": lambda c, k: _mean_defined(c.f1),
    "covid_sensitivity": lambda c, k: c.sensitivity[:, k],
    "covid_specificity": lambda c, k: c.specificity[:, k],
    "covid_accuracy": lambda c, k: (
        (c.total - c.support[:, k] - c.predicted[:, k] + 2 * c.tp[:, k]) / c.total
    ),
}
CONFUSION_METRICS = tuple(_CONFUSION)
"""The scalar metrics a confusion matrix decides (the `covid_` ones need a positive class)."""


def _mean_defined(x: np.ndarray) -> np.ndarray:
    """Row means over the defined (non-NaN) values, NaN for a row with none: `np.nanmean`'s
    arithmetic (sum with NaN as 0, divided by the count) without its per-call overhead."""
    ok = ~np.isnan(x)
    return np.where(ok, x, 0.0).sum(axis=1) / ok.sum(axis=1)


def confusion_scalar(cm: np.ndarray, metric: str, pos_idx: int | None) -> np.ndarray:
    """One of `CONFUSION_METRICS` for a batch of confusion matrices (B, C, C), by the same
    definition as `confusion_scalars` (what a scorer called thousands of times needs)."""
    if metric.startswith("covid_") and pos_idx is None:
        raise ConfigError(f"metric {metric!r} needs a positive class")
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0: NaN
        return _CONFUSION[metric](_Counts(cm), pos_idx if pos_idx is not None else -1)


def confusion_scalars(
    cm: np.ndarray, classes: Sequence[str], pos_idx: int | None
) -> dict[str, np.ndarray]:
    """Every scalar metric a confusion matrix decides, for a batch of them (B, C, C): the one
    definition used by `compute_metrics`, the bootstrap and the ensemble scorer (see the
    module doc; NaN where a denominator is zero)."""
    c = _Counts(cm)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0: NaN
        out = {
            name: f(c, pos_idx if pos_idx is not None else -1)
            for name, f in _CONFUSION.items()
            if pos_idx is not None or not name.startswith("covid_")
        }
        sens, spec = c.sensitivity, c.specificity
    for k, label in enumerate(classes):
        out[f"sensitivity_{label}"] = sens[:, k]
        out[f"specificity_{label}"] = spec[:, k]
    return out


# ----------------------------------------------------------------------------- internals


def validate_predictions(
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
