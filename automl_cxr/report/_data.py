"""Everything the report shows, computed from one study: :class:`ReportData`.

This module only assembles; each part is computed where its job is:

* :mod:`._records`  — the study's trials as one table (scores with CIs, costs, parameters);
* :mod:`._ranking`  — the leaderboard, the paired test against the best, best per group;
* :mod:`._paper`    — the paper-style table;
* :mod:`._plotdata` — the data behind each figure.

Nothing here (or there) draws or writes anything: every function takes a study (or the frames
built from it) and returns pandas DataFrames, dicts and lists, so the numbers behind each table
and figure are unit-tested without rendering (:mod:`._figures`, :mod:`._html` and
:mod:`._tables` render).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna
import pandas as pd
from optuna.trial import TrialState

from automl_cxr._compat.optuna import storage_of
from automl_cxr.engine import CV_FOLDS
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.oof import ENSEMBLE_ROUNDS
from automl_cxr.report._oofdata import DEFAULT_OPERATING_POINT, OofReport, build_oof_report
from automl_cxr.report._paper import paper_table
from automl_cxr.report._plotdata import (
    confusion_data,
    generalisation_gap,
    history_frame,
    learning_curves,
    param_importances,
    roc_data,
)
from automl_cxr.report._ranking import DEFAULT_ALPHA, best_per_group, leaderboard
from automl_cxr.report._records import (
    EXTERNAL_PREFIX,
    available_metrics,
    external_names,
    resolve_metric,
    state_counts,
    trial_records,
)
from automl_cxr.study import json_safe

__all__ = ["LEADERBOARD_COLUMNS", "ReportData", "build_report_data"]


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
    oof: OofReport | None = None
    externals: list[str] = field(default_factory=list)  # external sets the trials were scored on
    gap: pd.DataFrame | None = None  # generalisation_gap(): CV estimate vs external figure

    @property
    def best(self) -> dict | None:
        return None if self.board.empty else self.board.iloc[0].to_dict()

    @property
    def folds(self) -> str:
        """What the ranking's mean is over: "site-held-out folds", "patient-grouped folds"
        (or "folds" for a study that recorded no protocol)."""
        cv = (self.attrs.get("protocol") or {}).get("cv")
        return f"{CV_FOLDS[cv]} folds" if cv in CV_FOLDS else "folds"

    def leaderboard_records(self) -> list[dict]:
        """The leaderboard as JSON-ready dicts (NaN → None)."""
        cols = [c for c in LEADERBOARD_COLUMNS if c in self.board]
        cols += [c for c in self.board.columns if c.startswith(EXTERNAL_PREFIX)]
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
                "operating_points": self.oof.operating if self.oof else [],
                "ensemble": self.oof.ensemble if self.oof else None,
                "test": self.oof.test if self.oof else None,
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
    "ece",
    "ece_ci_low",
    "ece_ci_high",
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


def site_folds_note(folds: list[dict]) -> str:
    """How a site-held-out ranking treats its folds, with each fold's class counts (from its
    confusion matrix; the best trial's folds)."""
    parts = []
    for i, f in enumerate(folds):
        cm, classes = f.get("confusion_matrix"), f.get("classes")
        if not cm or not classes:
            continue
        held = [f"{c} {int(sum(row))}" for c, row in zip(classes, cm, strict=True) if sum(row)]
        one = " (one class only)" if len(held) == 1 else ""
        parts.append(f"fold {i}: {', '.join(held)}{one}")
    return (
        "site-held-out folds: each validates on whole sites (hospitals) the model did not "
        "train on. A fold that holds one class only scores that class's recall as its balanced "
        "accuracy and has no sensitivity or specificity for the absent class (those columns "
        "average the folds where they are defined); a lopsided fold weighs as much as any in "
        "the mean"
        + (f". Validation images per class, best trial: {'; '.join(parts)}" if parts else "")
    )


def build_report_data(
    study: optuna.Study,
    *,
    metric: str | None = None,
    top: int = 10,
    alpha: float = DEFAULT_ALPHA,
    storage: str | None = None,
    require_complete: bool = True,
    operating_point: str | None = DEFAULT_OPERATING_POINT,
    ensemble_rounds: int = ENSEMBLE_ROUNDS,
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
    metric = resolve_metric(attrs, metric, available_metrics(complete) or None)
    counts = state_counts(trials)
    records = trial_records(trials, metric)
    board = leaderboard(records, alpha=alpha)
    if require_complete and board.empty:
        listed = ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v) or "no trials"
        raise StorageError(
            f"study {study.study_name!r} has no complete trial with a {metric} score yet "
            f"({listed}): nothing to rank. Run `automl-cxr search` (or wait for it)."
        )
    oof = build_oof_report(
        study,
        storage or storage_of(study),
        board,
        metric=metric,
        positive=attrs.get("positive"),
        top=min(top, 4),
        point=operating_point,
        ensemble_rounds=ensemble_rounds,
    )
    board = (
        board.merge(
            oof.calibration[["number", "ece", "ece_ci_low", "ece_ci_high"]], on="number", how="left"
        )
        if len(board)
        else board
    )
    align = attrs.get("source_label_alignment") or {}
    notes: list[str] = []
    externals = external_names(records)
    if externals:
        notes.append(
            f"external sets {externals}: scored by each COMPLETE trial's fold models after the "
            "search chose nothing on them (no sampler, pruner or ranking sees them); intervals "
            "are bootstrap CIs over patients"
        )
    if (attrs.get("protocol") or {}).get("cv") == "site" and not board.empty:
        best = next(t for t in trials if t.number == int(board.iloc[0]["number"]))
        notes.append(site_folds_note((best.user_attrs.get("metrics") or {}).get("folds") or []))
    imp, imp_note = param_importances(records, trials)
    k = min(top, 4)
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
        notes=notes + oof.notes,
        oof=oof,
        externals=externals,
        gap=generalisation_gap(board, externals),
    )
