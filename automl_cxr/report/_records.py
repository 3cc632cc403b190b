"""A study's trials as one table: every trial, any state, with what the report needs.

Conventions
-----------
* A trial's score on a metric is the mean over its cross-validation folds, with the 95 %
  interval over folds the engine records (corrected resampled t, Nadeau & Bengio 2003), both
  read from the ``metrics`` user attribute the objective records
  (``metrics.summary.metrics.<name>``); older or partial records fall back to the scalar user
  attribute of the same name. Every quality metric is maximised, and lies in [0, 1]: the
  intervals shown are clipped to that range.
* PRUNED, FAIL, RUNNING and WAITING trials are counted (:func:`state_counts`) and kept in the
  table (history, learning curves); ranking (:mod:`._ranking`) uses COMPLETE trials only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from optuna.trial import FrozenTrial

from automl_cxr._numbers import finite_or_nan
from automl_cxr.errors import ConfigError
from automl_cxr.study import OBJECTIVE_KEYS

__all__ = [
    "COVID_KEYS",
    "EXTERNAL_PREFIX",
    "STATES",
    "available_metrics",
    "clip01",
    "external_names",
    "external_values",
    "hover_text",
    "params_text",
    "resolve_metric",
    "state_counts",
    "summary_metric",
    "finite_or_nan",
    "trial_records",
]

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
"""Trial states in the order the report counts them."""

_NAN = float("nan")
COVID_KEYS = ("covid_accuracy", "covid_sensitivity", "covid_specificity")
"""The COVID-19-vs-rest metrics every trial records."""


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


"""A float, NaN for None/non-numbers (stored NaNs come back as None)."""


def clip01(x: float) -> float:
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


def summary_metric(trial: FrozenTrial, name: str) -> dict[str, Any]:
    """`{"mean", "ci_low", "ci_high", "std", "n", "folds"}` of one metric of a trial."""
    m = trial.user_attrs.get("metrics") or {}
    s = ((m.get("summary") or {}).get("metrics") or {}).get(name)
    if isinstance(s, Mapping):
        return {
            "mean": finite_or_nan(s.get("mean")),
            "ci_low": clip01(finite_or_nan(s.get("ci_low"))),
            "ci_high": clip01(finite_or_nan(s.get("ci_high"))),
            "std": finite_or_nan(s.get("std")),
            "n": int(s.get("n") or 0),
            "folds": [finite_or_nan(v) for v in (s.get("folds") or [])],
        }
    mean = finite_or_nan(trial.user_attrs.get(name))
    return {
        "mean": mean,
        "ci_low": _NAN,
        "ci_high": _NAN,
        "std": _NAN,
        "n": 0 if math.isnan(mean) else 1,
        "folds": [],
    }


def available_metrics(trials: Sequence[FrozenTrial]) -> list[str]:
    names: list[str] = []
    for t in trials:
        m = ((t.user_attrs.get("metrics") or {}).get("summary") or {}).get("metrics") or {}
        for k in m:
            if k not in names:
                names.append(k)
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc", *COVID_KEYS):
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
    for key, val in row.items():
        is_ext = key.startswith(EXTERNAL_PREFIX) and not key.endswith(("_ci_low", "_ci_high"))
        if is_ext and isinstance(val, float) and not math.isnan(val):
            lines.append(f"external {key[len(EXTERNAL_PREFIX) :]}: {metric} = {val:.4f}")
    if not math.isnan(row.get("latency_ms", _NAN)):
        lines.append(f"latency = {row['latency_ms']:.2f} ms")
    if not math.isnan(row.get("params_total", _NAN)):
        lines.append(f"parameters = {int(row['params_total']):,}")
    for k, val in (row.get("params") or {}).items():
        lines.append(f"{k} = {_fmt_value(val)}")
    return "<br>".join(lines)


EXTERNAL_PREFIX = "ext_"
"""Record columns of external sets: ``ext_<name>`` (the study metric on that set, from the
trial's fold ensemble) with ``_ci_low``/``_ci_high`` (bootstrap over patients)."""


def external_values(externals: Any, metric: str) -> dict[str, float]:
    """``ext_<name>``, ``ext_<name>_ci_low``, ``ext_<name>_ci_high`` for every external set a
    trial was scored on (its `externals` user attribute); empty without one."""
    out: dict[str, float] = {}
    for name, rec in (externals or {}).items():
        point = finite_or_nan((rec.get("metrics") or {}).get(metric))
        ci = ((rec.get("bootstrap") or {}).get("metrics") or {}).get(metric) or {}
        key = f"{EXTERNAL_PREFIX}{name}"
        out[key] = point
        out[f"{key}_ci_low"] = finite_or_nan(ci.get("ci_low"))
        out[f"{key}_ci_high"] = finite_or_nan(ci.get("ci_high"))
    return out


def external_names(records: pd.DataFrame) -> list[str]:
    """The external sets present in the records, sorted."""
    return sorted(
        c[len(EXTERNAL_PREFIX) :]
        for c in records.columns
        if c.startswith(EXTERNAL_PREFIX) and not c.endswith(("_ci_low", "_ci_high"))
    )


def trial_records(trials: Sequence[FrozenTrial], metric: str) -> pd.DataFrame:
    """One row per trial (every state) with what the report needs, in trial-number order.

    Columns: number, state, value/ci_low/ci_high/std/n_folds/folds (the ranking metric),
    accuracy, covid_sensitivity, covid_specificity (each with _ci_low/_ci_high), backbone,
    head, frozen_fraction, frozen_stages, num_stages, frozen_depth ("k/n"), lr, latency_ms,
    params_total, params_trainable, train_seconds, duration_s, fail_reason, params (dict),
    params_text, splits (list or None), hover; and per external set ``ext_<name>`` with its
    bootstrap CI (see :func:`external_values`), NaN for trials not scored on it.
    """
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        ua = t.user_attrs
        cfg = ua.get("config") or {}
        model = cfg.get("model") or {}
        train = cfg.get("train") or {}
        s = summary_metric(t, metric)
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
        for name in ("accuracy", *COVID_KEYS):
            sm = summary_metric(t, name)
            row[name] = sm["mean"]
            row[f"{name}_ci_low"] = sm["ci_low"]
            row[f"{name}_ci_high"] = sm["ci_high"]
        frozen = model.get("frozen_stages")
        n_stages = cfg.get("num_stages")
        frac = t.params.get("frozen_fraction", cfg.get("frozen_fraction"))
        row.update(
            backbone=t.params.get("backbone", model.get("backbone")),
            head=t.params.get("head", model.get("head")),
            frozen_fraction=finite_or_nan(frac),
            frozen_stages=finite_or_nan(frozen),
            num_stages=finite_or_nan(n_stages),
            frozen_depth=(
                f"{int(frozen)}/{int(n_stages)}"
                if frozen is not None and n_stages is not None
                else None
            ),
            lr=finite_or_nan(t.params.get("lr", train.get("lr"))),
            latency_ms=finite_or_nan(ua.get("latency_ms")),
            params_total=finite_or_nan(ua.get("params_total")),
            params_trainable=finite_or_nan(ua.get("params_trainable")),
            train_seconds=finite_or_nan(ua.get("train_seconds")),
            duration_s=(t.duration.total_seconds() if t.duration is not None else _NAN),
            fail_reason=ua.get("fail_reason"),
            params=dict(t.params),
            params_text=params_text(t.params),
            splits=(ua.get("metrics") or {}).get("splits"),
        )
        row.update(external_values(ua.get("externals"), metric))
        row["hover"] = hover_text(row, metric)
        rows.append(row)
    cols = ["number", "state", "value", "ci_low", "ci_high", "std", "n_folds", "folds"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=cols)
    return frame
