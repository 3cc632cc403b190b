"""Caruana ensemble selection across a study's trials, on their out-of-fold predictions.

Greedy forward selection with replacement (Caruana et al. 2004): start from the best single
trial(s) (sorted initialisation, ``init_size``), then for ``n_rounds`` add the trial (possibly
one already in) whose addition gives the best score of the averaged probabilities. The result
is the best ensemble along that path (ties: the smaller one), so on the selection data it never
scores below the best single trial. Weights are the times each trial was picked / the total.

The score is the study's metric computed as the study computes it: per validation fold
(:func:`fold_score`, the engine's ``compute_metrics`` definitions), then the mean over folds.

A score selected on the same folds it is reported on is optimistic. :func:`nested_selection`
gives the honest number: for each fold h, select on the other K−1 folds and score the chosen
weights on fold h; the best single trial is chosen the same way, so the two nested numbers
compare like with like.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from automl_cxr.engine import CONFUSION_METRICS, WeightedEvaluator, confusion_scalar
from automl_cxr.errors import ConfigError

__all__ = [
    "ENSEMBLE_CAVEAT",
    "ENSEMBLE_ROUNDS",
    "caruana_select",
    "fold_score",
    "metric_scorer",
    "nested_selection",
    "select_ensemble",
]

ENSEMBLE_ROUNDS = 20
"""Caruana rounds (greedy additions, with replacement) unless asked otherwise."""

ENSEMBLE_CAVEAT = (
    "selected and scored on the same out-of-fold predictions: optimistic. The nested "
    "estimate selects on K-1 folds and scores the held-out fold (the best single trial "
    "chosen the same way beside it)."
)

Scorer = Callable[[np.ndarray, np.ndarray], float]


def metric_scorer(metric: str, classes: list[str], positive: str | None) -> Scorer:
    """``score(labels, probs)`` of one study metric on one set of predictions, by the engine's
    own definitions: confusion-matrix metrics through `confusion_scalar` on one bincount, the
    AUC through the weighted evaluator's rank sums (selection scores thousands of candidates,
    so neither goes through the full `compute_metrics`), the others through
    `compute_metrics`."""
    n_cls = len(classes)
    k_pos = classes.index(positive) if positive in classes else None
    if metric.startswith("covid_") and k_pos is None:
        raise ConfigError(f"metric {metric!r} needs a positive class; this study has none")
    if metric in CONFUSION_METRICS:

        def fast(y: np.ndarray, p: np.ndarray) -> float:
            cell = y * n_cls + p.argmax(axis=1)
            cm = np.bincount(cell, minlength=n_cls * n_cls).reshape(1, n_cls, n_cls)
            return float(confusion_scalar(cm.astype(float), metric, k_pos)[0])

        return fast
    if metric == "auc":

        def auc(y: np.ndarray, p: np.ndarray) -> float:
            return float(WeightedEvaluator(y, p).auc(np.ones((1, len(y))))[0])

        return auc
    from automl_cxr.engine import compute_metrics, scalar_metrics

    def slow(y: np.ndarray, p: np.ndarray) -> float:
        m = scalar_metrics(compute_metrics(y, p, classes, positive=positive))
        if metric not in m:
            raise ConfigError(f"metric {metric!r} is not computed; allowed: {sorted(m)}")
        return float(m[metric])

    return slow


def fold_score(
    probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, scorer: Scorer, use: set[int]
) -> float:
    """Mean over the folds in `use` of the score on each fold's rows."""
    vals = [scorer(labels[folds == f], probs[folds == f]) for f in sorted(use)]
    return float(np.nanmean(vals)) if vals else math.nan


def caruana_select(
    probs: Mapping[int, np.ndarray],
    labels: np.ndarray,
    folds: np.ndarray,
    scorer: Scorer,
    *,
    n_rounds: int = ENSEMBLE_ROUNDS,
    init_size: int = 1,
    use_folds: set[int] | None = None,
) -> dict[str, Any]:
    """Greedy forward selection with replacement over `probs` (trial → (N, C), rows aligned,
    validated rows only), scored on the folds `use_folds` (default: all).

    Returns ``{"weights": {trial: w}, "counts", "score", "best_single", "best_single_score",
    "single_scores", "trajectory": [score after each step], "size"}``.
    """
    if n_rounds < 1:
        raise ConfigError(f"--ensemble-select must be at least 1 round, but got {n_rounds}")
    if not probs:
        raise ConfigError("ensemble selection needs at least one trial with stored predictions")
    if init_size < 1:
        raise ConfigError(f"init_size must be at least 1, but got {init_size}")
    use = set(int(f) for f in np.unique(folds[folds >= 0])) if use_folds is None else use_folds
    keys = sorted(probs)
    single = {k: fold_score(probs[k], labels, folds, scorer, use) for k in keys}
    order = sorted(keys, key=lambda k: (-np.nan_to_num(single[k], nan=-np.inf), k))
    rank = {k: i for i, k in enumerate(order)}
    counts: Counter[int] = Counter(order[:init_size])
    total = sum(probs[k] * c for k, c in counts.items())
    size = sum(counts.values())
    best_counts = dict(counts)
    best_score = fold_score(total / size, labels, folds, scorer, use)
    trajectory = [best_score]
    for _ in range(n_rounds):
        scored = [
            (fold_score((total + probs[k]) / (size + 1), labels, folds, scorer, use), k)
            for k in keys
        ]
        s, k = max(scored, key=lambda t: (np.nan_to_num(t[0], nan=-np.inf), -rank[t[1]]))
        total = total + probs[k]
        size += 1
        counts[k] += 1
        trajectory.append(s)
        if s > best_score + 1e-12:
            best_score, best_counts = s, dict(counts)
    top = order[0]
    if single[top] > best_score:  # only possible with init_size > 1
        best_score, best_counts = single[top], {top: 1}
    n = sum(best_counts.values())
    return {
        "weights": {int(k): c / n for k, c in sorted(best_counts.items())},
        "counts": {int(k): int(c) for k, c in sorted(best_counts.items())},
        "score": float(best_score),
        "size": int(n),
        "best_single": int(top),
        "best_single_score": float(single[top]),
        "single_scores": {int(k): float(v) for k, v in single.items()},
        "trajectory": [float(v) for v in trajectory],
        "n_rounds": n_rounds,
        "init_size": init_size,
        "folds": sorted(use),
    }


def _mix(probs: Mapping[int, np.ndarray], weights: Mapping[int, float]) -> np.ndarray:
    return sum(probs[k] * w for k, w in weights.items())


def nested_selection(
    probs: Mapping[int, np.ndarray],
    labels: np.ndarray,
    folds: np.ndarray,
    scorer: Scorer,
    *,
    n_rounds: int = ENSEMBLE_ROUNDS,
    init_size: int = 1,
) -> dict[str, Any]:
    """Select on K−1 folds, score on the held-out one, for each fold; the same for the best
    single trial. Returns per-fold and mean scores with a t-interval over folds."""
    from scipy import stats

    all_folds = sorted(int(f) for f in np.unique(folds[folds >= 0]))
    if len(all_folds) < 2:
        return {"available": False, "reason": f"needs at least 2 folds, has {len(all_folds)}"}
    ens, single = [], []
    for h in all_folds:
        sel = caruana_select(
            probs,
            labels,
            folds,
            scorer,
            n_rounds=n_rounds,
            init_size=init_size,
            use_folds=set(all_folds) - {h},
        )
        ens.append(fold_score(_mix(probs, sel["weights"]), labels, folds, scorer, {h}))
        single.append(fold_score(probs[sel["best_single"]], labels, folds, scorer, {h}))

    def summary(v: list[float]) -> dict[str, Any]:
        a = np.asarray(v, dtype=float)
        mean = float(np.mean(a))
        if len(a) > 1 and np.std(a, ddof=1) > 0:
            lo, hi = stats.t.interval(0.95, len(a) - 1, loc=mean, scale=stats.sem(a))
        else:
            lo = hi = mean
        return {"mean": mean, "ci_low": float(lo), "ci_high": float(hi), "folds": list(v)}

    return {"available": True, "ensemble": summary(ens), "best_single": summary(single)}


def select_ensemble(
    oofs: Mapping[int, Any], *, metric: str, positive: str | None, rounds: int = ENSEMBLE_ROUNDS
) -> dict[str, Any]:
    """Caruana selection over trials' out-of-fold predictions (trial number → stored
    predictions, each `.valid()`), optimistic, with its nested estimate beside it: what the
    report shows and what `export --ensemble-select` builds. Returns `caruana_select`'s
    fields plus `metric`, `n_rounds`, `candidates`, `nested`, `members` (number, weight,
    single score; heaviest first) and `caveat`."""
    first = next(iter(oofs.values())).valid()
    probs = {n: o.valid().probs for n, o in oofs.items()}
    scorer = metric_scorer(metric, first.classes, positive)
    sel = caruana_select(probs, first.labels, first.folds, scorer, n_rounds=rounds)
    nested = nested_selection(probs, first.labels, first.folds, scorer, n_rounds=rounds)
    return {
        **sel,
        "metric": metric,
        "n_rounds": rounds,
        "candidates": len(probs),
        "nested": nested,
        "members": [
            {"number": n, "weight": w, "single_score": sel["single_scores"][n]}
            for n, w in sorted(sel["weights"].items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        "caveat": ENSEMBLE_CAVEAT,
    }
