"""The data behind the report's figures: history, Pareto front, importances, learning curves,
confusion matrices and ROC curves. Plain frames and dicts; drawing is :mod:`._figures`' job."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from automl_cxr._numbers import finite_or_nan
from automl_cxr.report._records import EXTERNAL_PREFIX

__all__ = [
    "confusion_data",
    "generalisation_gap",
    "history_frame",
    "learning_curves",
    "param_importances",
    "pareto_flags",
    "roc_data",
]


def history_frame(records: pd.DataFrame) -> pd.DataFrame:
    """Every finished trial in number order with its score and the best score so far (over
    COMPLETE trials); pruned and failed trials keep NaN scores but hold their place."""
    if records.empty:
        return pd.DataFrame(columns=["number", "state", "value", "best_so_far", "hover"])
    h = records[records["state"].isin(["COMPLETE", "PRUNED", "FAIL"])]
    h = h[["number", "state", "value", "ci_low", "ci_high", "hover"]].copy()
    ok = h["value"].where(h["state"] == "COMPLETE")
    h["best_so_far"] = ok.cummax().ffill()
    return h.reset_index(drop=True)


def pareto_flags(values: Sequence[float], costs: Sequence[float]) -> list[bool]:
    """True for points not dominated (score maximised, cost minimised); NaNs are never on the
    front. A point is dominated when another is at least as good on both and better on one."""
    v = np.asarray(values, dtype=float)
    c = np.asarray(costs, dtype=float)
    ok = ~(np.isnan(v) | np.isnan(c))
    flags = []
    for i in range(v.size):
        if not ok[i]:
            flags.append(False)
            continue
        dominated = ok & (v >= v[i]) & (c <= c[i]) & ((v > v[i]) | (c < c[i]))
        flags.append(not bool(dominated.any()))
    return flags


def param_importances(
    records: pd.DataFrame, trials: Sequence[FrozenTrial], *, seed: int = 0
) -> tuple[pd.DataFrame, str | None]:
    """Hyperparameter importance for the ranking metric (Optuna's default evaluator, fANOVA,
    seeded so a report is reproducible, run on the COMPLETE trials with a finite score).
    Returns ``(frame[param, importance], note)``; the frame is empty, and the note says why,
    when it cannot be computed."""
    empty = pd.DataFrame(columns=["param", "importance"])
    done = records[(records["state"] == "COMPLETE") & records["value"].notna()]
    if len(done) < 2:
        return empty, f"needs at least 2 complete trials (has {len(done)})"
    by_number = {t.number: t for t in trials}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        tmp = optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for r in done.itertuples():
        t = by_number[int(r.number)]
        tmp.add_trial(
            optuna.trial.create_trial(
                params=t.params, distributions=t.distributions, value=float(r.value)
            )
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(
                tmp, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)
            )
    except Exception as exc:  # too few distinct values, a single varying parameter, ...
        return empty, f"not computable: {type(exc).__name__}: {exc}"
    if not imp:
        return empty, "no parameter varies across the complete trials"
    frame = pd.DataFrame({"param": list(imp), "importance": [float(v) for v in imp.values()]})
    note = None
    if len(done) < 10:
        note = f"from only {len(done)} complete trials: a rough indication"
    return frame, note


def learning_curves(trials: Sequence[FrozenTrial], records: pd.DataFrame) -> pd.DataFrame:
    """Long frame of intermediate values: number, state, step, fold, epoch, value, hover.

    The objective reports ``step = fold * epochs + epoch``; fold and epoch are recovered from
    the trial's configured epochs (None when the trial has no recorded configuration). Running
    and pruned trials are included."""
    hover = dict(zip(records["number"], records["hover"], strict=False)) if len(records) else {}
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        epochs = ((t.user_attrs.get("config") or {}).get("train") or {}).get("epochs")
        epochs = int(epochs) if isinstance(epochs, int) and epochs > 0 else None
        for step, value in sorted(t.intermediate_values.items()):
            rows.append(
                {
                    "number": t.number,
                    "state": t.state.name,
                    "step": int(step),
                    "fold": int(step) // epochs if epochs else None,
                    "epoch": int(step) % epochs if epochs else None,
                    "value": finite_or_nan(value),
                    "hover": hover.get(t.number, ""),
                }
            )
    return pd.DataFrame(
        rows, columns=["number", "state", "step", "fold", "epoch", "value", "hover"]
    )


def confusion_data(board: pd.DataFrame, trials: Sequence[FrozenTrial], k: int) -> list[dict]:
    """Confusion matrices (summed over folds; rows true, columns predicted) of the top `k`."""
    by_number = {t.number: t for t in trials}
    out = []
    for r in board.head(k).itertuples():
        t = by_number[int(r.number)]
        m = t.user_attrs.get("metrics") or {}
        summary = m.get("summary") or {}
        cm = summary.get("confusion_matrix") or t.user_attrs.get("confusion_matrix")
        classes = summary.get("classes") or m.get("classes")
        if cm is None or classes is None:
            continue
        out.append(
            {
                "number": int(r.number),
                "rank": int(r.rank),
                "backbone": r.backbone,
                "classes": list(classes),
                "matrix": [list(map(int, row)) for row in cm],
            }
        )
    return out


def roc_data(board: pd.DataFrame, trials: Sequence[FrozenTrial], k: int) -> list[dict]:
    """One-vs-rest ROC curves (pooled out-of-fold predictions) of the top `k` trials."""
    by_number = {t.number: t for t in trials}
    out = []
    for r in board.head(k).itertuples():
        roc = (by_number[int(r.number)].user_attrs.get("metrics") or {}).get("roc") or {}
        curves = {
            label: {
                "fpr": list(c.get("fpr") or []),
                "tpr": list(c.get("tpr") or []),
                "auc": finite_or_nan(c.get("auc")),
            }
            for label, c in roc.items()
        }
        if curves:
            out.append(
                {
                    "number": int(r.number),
                    "rank": int(r.rank),
                    "backbone": r.backbone,
                    "curves": curves,
                }
            )
    return out


def generalisation_gap(board: pd.DataFrame, externals: Sequence[str]) -> pd.DataFrame:
    """Per ranked trial and external set: the cross-validation estimate (with its CI) beside
    the external figure (with its bootstrap CI) and `gap` = CV − external (positive: the CV
    estimate was optimistic). Trials not scored on a set are left out."""
    cols = [
        "number", "external", "cv", "cv_ci_low", "cv_ci_high",
        "ext", "ext_ci_low", "ext_ci_high", "gap", "backbone", "hover",
    ]  # fmt: skip
    rows = []
    for name in externals:
        key = f"{EXTERNAL_PREFIX}{name}"
        if key not in board:
            continue
        for r in board.to_dict(orient="records"):
            ext = finite_or_nan(r.get(key))
            cv = finite_or_nan(r.get("value"))
            if np.isnan(ext) or np.isnan(cv):
                continue
            rows.append(
                {
                    "number": int(r["number"]),
                    "external": name,
                    "cv": cv,
                    "cv_ci_low": finite_or_nan(r.get("ci_low")),
                    "cv_ci_high": finite_or_nan(r.get("ci_high")),
                    "ext": ext,
                    "ext_ci_low": finite_or_nan(r.get(f"{key}_ci_low")),
                    "ext_ci_high": finite_or_nan(r.get(f"{key}_ci_high")),
                    "gap": cv - ext,
                    "backbone": r.get("backbone"),
                    "hover": r.get("hover", ""),
                }
            )
    return pd.DataFrame(rows, columns=cols)
