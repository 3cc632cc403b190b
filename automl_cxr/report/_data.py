"""The report's information as plain data: trials, leaderboard, groupings, plot data.

Nothing here draws or writes anything; every function takes a study (or the frames built from
it) and returns pandas DataFrames, dicts and lists, so the numbers behind each table and figure
are unit-tested without rendering.

Conventions
-----------
* A trial's score on a metric is the mean over its cross-validation folds, with the Student-t
  95 % interval over folds, both read from the ``metrics`` user attribute the objective records
  (``metrics.summary.metrics.<name>``); older or partial records fall back to the scalar user
  attribute of the same name. Every quality metric is maximised, and lies in [0, 1]: the
  intervals shown are clipped to that range.
* Only COMPLETE trials with a finite score are ranked. PRUNED, FAIL, RUNNING and WAITING trials
  are counted (:func:`state_counts`) and drawn where they make sense (history, learning curves),
  never ranked.
* Ties on the score are broken by cost: lower latency, then fewer parameters, then the earlier
  trial.
* "Not significantly worse than the best" (:func:`not_worse_than_best`): a one-sided paired
  t-test of the trial's fold scores against the best trial's on the same folds
  (:func:`automl_cxr.engine.paired_comparison`, ``alternative="less"``); the trial is marked when
  ``p >= alpha``. No multiple-comparison correction is applied (marking more trials as equally
  good is the conservative side here). With fewer than two paired folds, or folds that do not
  match, the test cannot be run and the mark is ``None``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from automl_cxr.engine import paired_comparison
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.study import OBJECTIVE_KEYS, json_safe, load_study

__all__ = [
    "DEFAULT_ALPHA",
    "PAPER_CAVEAT",
    "PAPER_KEYS",
    "STATES",
    "ReportData",
    "best_per_group",
    "build_report_data",
    "compare_best_per_backbone",
    "confusion_data",
    "history_frame",
    "leaderboard",
    "learning_curves",
    "load_study",
    "not_worse_than_best",
    "paper_table",
    "param_importances",
    "pareto_flags",
    "resolve_metric",
    "roc_data",
    "state_counts",
    "trial_records",
]

DEFAULT_ALPHA = 0.05
STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
"""Trial states in the order the report counts them."""

PAPER_CAVEAT = (
    "The paper's numbers come from a different protocol: 10-fold cross-validation at image "
    "level, without patient grouping (images of one patient can sit in both the training and "
    "the test folds), and are reported without intervals; ours are patient-grouped "
    "cross-validation means with 95 % t-intervals over folds. Neither protocol controls for "
    "source confounding (every COVID-19 image from one collection, the other classes from "
    "another), which may inflate both sets of numbers. The rows stand side by side for "
    "orientation, not as a like-for-like comparison."
)

_NAN = float("nan")
_COVID = ("covid_accuracy", "covid_sensitivity", "covid_specificity")
PAPER_KEYS = ("accuracy", *_COVID)
"""Metric columns of the paper-style table, in order."""


# ----------------------------------------------------------------------------- the study


def state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials per state, every state of :data:`STATES` present (0 when none)."""
    counts = {s: 0 for s in STATES}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def resolve_metric(
    study_attrs: Mapping[str, Any], metric: str | None, available: Sequence[str] | None = None
) -> str:
    """The metric to rank by: `metric`, else the study's objective (its first quality metric).

    `available` (metric names the finished trials carry) validates an explicit choice.
    """
    if metric is None:
        objectives = list(study_attrs.get("objectives") or [])
        first = study_attrs.get("metric")
        candidates = ([first] if first else []) + objectives
        metric = next((m for m in candidates if m and m not in OBJECTIVE_KEYS), "balanced_accuracy")
    if metric in OBJECTIVE_KEYS:
        raise ConfigError(
            f"--metric {metric!r} is a cost, not a score; costs are shown next to the score "
            "(latency_ms, params_total) and break ties"
        )
    if available is not None and len(available) and metric not in available:
        raise ConfigError(f"unknown metric {metric!r} for this study; allowed: {sorted(available)}")
    return metric


def _num(x: Any) -> float:
    """A float, NaN for None/non-numbers (stored NaNs come back as None)."""
    if x is None or isinstance(x, bool):
        return _NAN
    try:
        f = float(x)
    except (TypeError, ValueError):
        return _NAN
    return f if math.isfinite(f) else _NAN


def _clip01(x: float) -> float:
    """Every ranked metric is a proportion or an AUC: its interval is clipped to [0, 1] (a
    t-interval over few folds can overshoot; the stored record keeps the raw bounds)."""
    return x if math.isnan(x) else min(1.0, max(0.0, x))


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def params_text(params: Mapping[str, Any], sep: str = ", ") -> str:
    """`backbone=..., head=..., lr=0.001` in a stable order (backbone, frozen, head first)."""
    first = [k for k in ("backbone", "frozen_fraction", "head") if k in params]
    rest = sorted(k for k in params if k not in first)
    return sep.join(f"{k}={_fmt_value(params[k])}" for k in first + rest)


def _summary_metric(trial: FrozenTrial, name: str) -> dict[str, Any]:
    """`{"mean", "ci_low", "ci_high", "std", "n", "folds"}` of one metric of a trial."""
    m = trial.user_attrs.get("metrics") or {}
    s = ((m.get("summary") or {}).get("metrics") or {}).get(name)
    if isinstance(s, Mapping):
        return {
            "mean": _num(s.get("mean")),
            "ci_low": _clip01(_num(s.get("ci_low"))),
            "ci_high": _clip01(_num(s.get("ci_high"))),
            "std": _num(s.get("std")),
            "n": int(s.get("n") or 0),
            "folds": [_num(v) for v in (s.get("folds") or [])],
        }
    mean = _num(trial.user_attrs.get(name))
    return {
        "mean": mean,
        "ci_low": _NAN,
        "ci_high": _NAN,
        "std": _NAN,
        "n": 0 if math.isnan(mean) else 1,
        "folds": [],
    }


def _available_metrics(trials: Sequence[FrozenTrial]) -> list[str]:
    names: list[str] = []
    for t in trials:
        m = ((t.user_attrs.get("metrics") or {}).get("summary") or {}).get("metrics") or {}
        for k in m:
            if k not in names:
                names.append(k)
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc", *_COVID):
            if k in t.user_attrs and k not in names:
                names.append(k)
    return names


def hover_text(row: Mapping[str, Any], metric: str) -> str:
    """Plotly hover text of one trial: number, state, score with CI, costs, every parameter."""
    lines = [f"<b>trial {row['number']}</b> ({row['state']})"]
    v = row.get("value", _NAN)
    if isinstance(v, float) and not math.isnan(v):
        ci = ""
        if not (math.isnan(row.get("ci_low", _NAN)) or math.isnan(row.get("ci_high", _NAN))):
            ci = f" [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
        lines.append(f"{metric} = {v:.4f}{ci}")
    if not math.isnan(row.get("latency_ms", _NAN)):
        lines.append(f"latency = {row['latency_ms']:.2f} ms")
    if not math.isnan(row.get("params_total", _NAN)):
        lines.append(f"parameters = {int(row['params_total']):,}")
    for k, val in (row.get("params") or {}).items():
        lines.append(f"{k} = {_fmt_value(val)}")
    return "<br>".join(lines)


def trial_records(trials: Sequence[FrozenTrial], metric: str) -> pd.DataFrame:
    """One row per trial (every state) with what the report needs, in trial-number order.

    Columns: number, state, value/ci_low/ci_high/std/n_folds/folds (the ranking metric),
    accuracy, covid_sensitivity, covid_specificity (each with _ci_low/_ci_high), backbone,
    head, frozen_fraction, frozen_stages, num_stages, frozen_depth ("k/n"), lr, latency_ms,
    params_total, params_trainable, train_seconds, duration_s, fail_reason, params (dict),
    params_text, splits (list or None), hover.
    """
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        ua = t.user_attrs
        cfg = ua.get("config") or {}
        model = cfg.get("model") or {}
        train = cfg.get("train") or {}
        s = _summary_metric(t, metric)
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": s["mean"],
            "ci_low": s["ci_low"],
            "ci_high": s["ci_high"],
            "std": s["std"],
            "n_folds": s["n"],
            "folds": s["folds"],
        }
        for name in ("accuracy", *_COVID):
            sm = _summary_metric(t, name)
            row[name] = sm["mean"]
            row[f"{name}_ci_low"] = sm["ci_low"]
            row[f"{name}_ci_high"] = sm["ci_high"]
        frozen = model.get("frozen_stages")
        n_stages = cfg.get("num_stages")
        frac = t.params.get("frozen_fraction", cfg.get("frozen_fraction"))
        row.update(
            backbone=t.params.get("backbone", model.get("backbone")),
            head=t.params.get("head", model.get("head")),
            frozen_fraction=_num(frac),
            frozen_stages=_num(frozen),
            num_stages=_num(n_stages),
            frozen_depth=(
                f"{int(frozen)}/{int(n_stages)}"
                if frozen is not None and n_stages is not None
                else None
            ),
            lr=_num(t.params.get("lr", train.get("lr"))),
            latency_ms=_num(ua.get("latency_ms")),
            params_total=_num(ua.get("params_total")),
            params_trainable=_num(ua.get("params_trainable")),
            train_seconds=_num(ua.get("train_seconds")),
            duration_s=(t.duration.total_seconds() if t.duration is not None else _NAN),
            fail_reason=ua.get("fail_reason"),
            params=dict(t.params),
            params_text=params_text(t.params),
            splits=(ua.get("metrics") or {}).get("splits"),
        )
        row["hover"] = hover_text(row, metric)
        rows.append(row)
    cols = ["number", "state", "value", "ci_low", "ci_high", "std", "n_folds", "folds"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=cols)
    return frame


# ----------------------------------------------------------------------------- ranking


def not_worse_than_best(
    folds: Mapping[int, Sequence[float]],
    best: int,
    *,
    alpha: float = DEFAULT_ALPHA,
    splits: Mapping[int, Any] | None = None,
) -> dict[int, dict[str, Any]]:
    """Which trials are not significantly worse than `best` on the same folds.

    Args:
        folds: per trial, its per-fold scores (same fold order for every trial).
        best: the key of the best trial in `folds`.
        alpha: the test level.
        splits: per trial, a description of its folds (e.g. the recorded ``splits``); trials
            whose folds differ from the best trial's are not tested.

    Returns:
        per trial ``{"p_value", "mean_diff", "n", "not_worse"}``: ``not_worse`` is True when
        the one-sided paired t-test (H1: trial < best) gives ``p >= alpha``, False when
        ``p < alpha``, and None when it cannot be run (fewer than two paired folds, or other
        folds). The best trial itself is True with ``p_value = 1``.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), but got alpha={alpha}")
    if best not in folds:
        raise ConfigError(f"best trial {best!r} is not among the trials given")
    ref = np.asarray(folds[best], dtype=float)
    out: dict[int, dict[str, Any]] = {}
    for key, values in folds.items():
        a = np.asarray(values, dtype=float)
        if key == best:
            out[key] = {
                "p_value": 1.0,
                "mean_diff": 0.0,
                "n": int(np.sum(~np.isnan(a))),
                "not_worse": True,
            }
            continue
        same_folds = a.size == ref.size and (splits is None or splits.get(key) == splits.get(best))
        if not same_folds:
            out[key] = {"p_value": _NAN, "mean_diff": _NAN, "n": 0, "not_worse": None}
            continue
        res = paired_comparison(a, ref, alternative="less")
        p = float(res["p_value"])
        out[key] = {
            "p_value": p,
            "mean_diff": float(res["mean_diff"]),
            "n": int(res["n"]),
            "not_worse": None if math.isnan(p) else bool(p >= alpha),
        }
    return out


def leaderboard(records: pd.DataFrame, *, alpha: float = DEFAULT_ALPHA) -> pd.DataFrame:
    """COMPLETE trials with a finite score, best first; ties broken by latency, parameters,
    trial number. Adds ``rank`` (1-based), ``p_vs_best``, ``diff_vs_best`` and ``not_worse``
    (see :func:`not_worse_than_best`)."""
    if records.empty:
        return records.assign(rank=pd.Series(dtype=int))
    done = records[(records["state"] == "COMPLETE") & records["value"].notna()].copy()
    if done.empty:
        return done.assign(
            rank=pd.Series(dtype=int),
            p_vs_best=pd.Series(dtype=float),
            diff_vs_best=pd.Series(dtype=float),
            not_worse=pd.Series(dtype=object),
        )
    done["_lat"] = done["latency_ms"].fillna(math.inf)
    done["_par"] = done["params_total"].fillna(math.inf)
    done = done.sort_values(
        ["value", "_lat", "_par", "number"], ascending=[False, True, True, True], kind="mergesort"
    ).drop(columns=["_lat", "_par"])
    done.insert(0, "rank", range(1, len(done) + 1))
    best = int(done.iloc[0]["number"])
    marks = not_worse_than_best(
        {int(r.number): list(r.folds) for r in done.itertuples()},
        best,
        alpha=alpha,
        splits={int(r.number): json_safe(r.splits) for r in done.itertuples()},
    )
    done["p_vs_best"] = [marks[int(n)]["p_value"] for n in done["number"]]
    done["diff_vs_best"] = [marks[int(n)]["mean_diff"] for n in done["number"]]
    done["not_worse"] = pd.Series(
        [marks[int(n)]["not_worse"] for n in done["number"]], index=done.index, dtype=object
    )
    return done.reset_index(drop=True)


def best_per_group(board: pd.DataFrame, by: str) -> pd.DataFrame:
    """The top-ranked trial of each value of `by` (backbone, frozen_depth, head, ...), with
    ``n_trials`` ranked in that group; groups in the order of their best trial's rank."""
    if board.empty or by not in board:
        return pd.DataFrame(columns=[by, "n_trials", "rank", "number", "value"])
    key = board[by].astype(str).where(board[by].notna(), "?")
    counts = key.value_counts()
    first = board.assign(_k=key).drop_duplicates("_k", keep="first")
    first = first.assign(n_trials=[int(counts[k]) for k in first["_k"]])
    first[by] = first["_k"]
    cols = [
        by,
        "n_trials",
        "rank",
        "number",
        "value",
        "ci_low",
        "ci_high",
        "n_folds",
        "accuracy",
        "covid_sensitivity",
        "covid_specificity",
        "latency_ms",
        "params_total",
        "not_worse",
        "params_text",
    ]
    return first[[c for c in cols if c in first]].reset_index(drop=True)


def paper_table(board: pd.DataFrame, paper: Mapping[str, Any] | None) -> pd.DataFrame:
    """The paper-style table: our best trial overall and per backbone, with 95 % CIs over
    folds, and the paper's reported numbers (no interval) in the last row.

    Columns: row, trial, backbone, source, and for accuracy / covid_accuracy /
    covid_sensitivity / covid_specificity the mean with ``_ci_low`` / ``_ci_high``. The paper's
    96.78 % headline is a COVID-19-vs-rest ("2-class") accuracy, so it sits in ``covid_accuracy``
    (studies made before that metric existed stored it as ``accuracy``; it is moved over).
    """
    rows = []
    keys = PAPER_KEYS

    def row_of(label: str, r: Mapping[str, Any]) -> dict[str, Any]:
        d: dict[str, Any] = {
            "row": label,
            "trial": int(r["number"]),
            "backbone": r.get("backbone"),
            "source": "this study",
        }
        for k in keys:
            d[k] = r.get(k, _NAN)
            d[f"{k}_ci_low"] = r.get(f"{k}_ci_low", _NAN)
            d[f"{k}_ci_high"] = r.get(f"{k}_ci_high", _NAN)
        return d

    if not board.empty:
        rows.append(row_of("best overall", board.iloc[0].to_dict()))
        for _, r in best_per_group(board, "backbone").iterrows():
            full = board[board["number"] == r["number"]].iloc[0].to_dict()
            rows.append(row_of(f"best {r['backbone']}", full))
    if paper:
        paper = dict(paper)
        if "covid_accuracy" not in paper and "accuracy" in paper:
            paper["covid_accuracy"] = paper.pop("accuracy")
        d = {
            "row": f"{paper.get('reference', 'seed paper')} (reported)",
            "trial": None,
            "backbone": paper.get("backbone", "MobileNet v2"),
            "source": "paper",
        }
        for k in keys:
            d[k] = _num(paper.get(k))
            d[f"{k}_ci_low"] = _NAN
            d[f"{k}_ci_high"] = _NAN
        rows.append(d)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- plot data


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
    """Hyperparameter importance for the ranking metric (Optuna's default evaluator, run on
    the COMPLETE trials with a finite score). Returns ``(frame[param, importance], note)``;
    the frame is empty, and the note says why, when it cannot be computed."""
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
            imp = optuna.importance.get_param_importances(tmp)
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
                    "value": _num(value),
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
                "auc": _num(c.get("auc")),
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


def compare_best_per_backbone(a: ReportData, b: ReportData) -> pd.DataFrame:
    """Side by side: the best trial per backbone of two studies, on `a`'s metric."""
    ga = best_per_group(a.board, "backbone")
    gb = best_per_group(b.board, "backbone")
    names = list(dict.fromkeys([*ga.get("backbone", []), *gb.get("backbone", [])]))
    rows = []
    for name in names:
        row: dict[str, Any] = {"backbone": name}
        for tag, g in (("a", ga), ("b", gb)):
            hit = g[g["backbone"] == name] if not g.empty else g
            if len(hit):
                r = hit.iloc[0]
                row.update(
                    {
                        f"{tag}_trial": int(r["number"]),
                        f"{tag}_value": r["value"],
                        f"{tag}_ci_low": r["ci_low"],
                        f"{tag}_ci_high": r["ci_high"],
                        f"{tag}_n_trials": int(r["n_trials"]),
                    }
                )
            else:
                row.update(
                    {
                        f"{tag}_trial": None,
                        f"{tag}_value": _NAN,
                        f"{tag}_ci_low": _NAN,
                        f"{tag}_ci_high": _NAN,
                        f"{tag}_n_trials": 0,
                    }
                )
        row["difference"] = row["a_value"] - row["b_value"]
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- all together


@dataclass
class ReportData:
    """Everything the report shows, computed from one study."""

    study_name: str
    storage: str
    metric: str
    attrs: dict
    directions: list[str]
    counts: dict[str, int]
    records: pd.DataFrame
    board: pd.DataFrame
    top: int
    alpha: float
    warning: str | None
    cramers_v: float | None
    by_backbone: pd.DataFrame
    by_frozen: pd.DataFrame
    by_head: pd.DataFrame
    paper: pd.DataFrame
    history: pd.DataFrame
    importances: pd.DataFrame
    importance_note: str | None
    curves: pd.DataFrame
    confusions: list[dict]
    rocs: list[dict]
    compare: pd.DataFrame | None = None
    compare_name: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> dict | None:
        return None if self.board.empty else self.board.iloc[0].to_dict()

    def leaderboard_records(self) -> list[dict]:
        """The leaderboard as JSON-ready dicts (NaN → None)."""
        cols = [c for c in LEADERBOARD_COLUMNS if c in self.board]
        return [json_safe(r) for r in self.board[cols].to_dict(orient="records")]

    def summary(self) -> dict:
        """A JSON-ready summary: study, metric, counts, warning, leaderboard."""
        return json_safe(
            {
                "study": self.study_name,
                "storage": self.storage,
                "dataset": self.attrs.get("dataset"),
                "metric": self.metric,
                "confidence": 0.95,
                "alpha": self.alpha,
                "counts": self.counts,
                "source_label_warning": self.warning,
                "leaderboard": self.leaderboard_records(),
            }
        )


LEADERBOARD_COLUMNS = (
    "rank",
    "number",
    "value",
    "ci_low",
    "ci_high",
    "std",
    "n_folds",
    "not_worse",
    "p_vs_best",
    "diff_vs_best",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "covid_accuracy",
    "covid_accuracy_ci_low",
    "covid_accuracy_ci_high",
    "covid_sensitivity",
    "covid_sensitivity_ci_low",
    "covid_sensitivity_ci_high",
    "covid_specificity",
    "covid_specificity_ci_low",
    "covid_specificity_ci_high",
    "backbone",
    "frozen_depth",
    "frozen_fraction",
    "head",
    "lr",
    "latency_ms",
    "params_total",
    "params_trainable",
    "train_seconds",
    "params",
)
"""Leaderboard columns of the exports, in order (``number`` is the Optuna trial number)."""


def build_report_data(
    study: optuna.Study,
    *,
    metric: str | None = None,
    top: int = 10,
    alpha: float = DEFAULT_ALPHA,
    storage: str | None = None,
    require_complete: bool = True,
) -> ReportData:
    """All the report's data for one study.

    Raises:
        StorageError: when `require_complete` and the study has no COMPLETE trial with a
            score (an empty study, or one whose trials all failed or were pruned).
        ConfigError: for an unknown `metric` or a `top` below 1.
    """
    if top < 1:
        raise ConfigError(f"--top must be at least 1, but got {top}")
    trials = study.get_trials(deepcopy=False)
    attrs = dict(study.user_attrs)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    metric = resolve_metric(attrs, metric, _available_metrics(complete) or None)
    counts = state_counts(trials)
    records = trial_records(trials, metric)
    board = leaderboard(records, alpha=alpha)
    if require_complete and board.empty:
        listed = ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v) or "no trials"
        raise StorageError(
            f"study {study.study_name!r} has no complete trial with a {metric} score yet "
            f"({listed}): nothing to rank. Run `automl-cxr search` (or wait for it)."
        )
    align = attrs.get("source_label_alignment") or {}
    imp, imp_note = param_importances(records, trials)
    k = min(top, 4)
    notes = []
    excluded = {s: n for s, n in counts.items() if s != "COMPLETE" and n}
    if excluded:
        notes.append(
            "not ranked: "
            + ", ".join(f"{n} {s.lower()}" for s, n in excluded.items())
            + " trial(s)"
        )
    if counts.get("FAIL"):
        reasons = records.loc[records["state"] == "FAIL", "fail_reason"].fillna(
            "no reason recorded"
        )
        top_reasons = reasons.astype(str).str.slice(0, 160).value_counts().head(3)
        notes.append("failed trials: " + "; ".join(f"{n}× {r}" for r, n in top_reasons.items()))
    n_nan = (
        int(((records["state"] == "COMPLETE") & records["value"].isna()).sum())
        if len(records)
        else 0
    )
    if n_nan:
        notes.append(f"{n_nan} complete trial(s) have no {metric} score and are not ranked")
    return ReportData(
        study_name=study.study_name,
        storage=storage or "",
        metric=metric,
        attrs=attrs,
        directions=[d.name.lower() for d in study.directions],
        counts=counts,
        records=records,
        board=board,
        top=top,
        alpha=alpha,
        warning=align.get("warning"),
        cramers_v=align.get("cramers_v"),
        by_backbone=best_per_group(board, "backbone"),
        by_frozen=best_per_group(board, "frozen_depth"),
        by_head=best_per_group(board, "head"),
        paper=paper_table(board, attrs.get("paper")),
        history=history_frame(records),
        importances=imp,
        importance_note=imp_note,
        curves=learning_curves(trials, records),
        confusions=confusion_data(board, trials, k),
        rocs=roc_data(board, trials, k),
        notes=notes,
    )
