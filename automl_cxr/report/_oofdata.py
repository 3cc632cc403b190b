"""What the report shows from the stored out-of-fold predictions (:mod:`automl_cxr.oof`):
calibration of every ranked trial, reliability and operating points of the top trials, and
Caruana ensemble selection across the study's COMPLETE trials. Plain data, no drawing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
import pandas as pd

from automl_cxr.engine import metric_figure
from automl_cxr.errors import ConfigError
from automl_cxr.oof import (
    ENSEMBLE_ROUNDS,
    calibration_summary,
    crossfit_operating_point,
    crossfit_parts,
    load_study_oof,
    parse_operating_point,
    select_ensemble,
)

__all__ = ["DEFAULT_OPERATING_POINT", "OofReport", "build_oof_report", "score_test_split"]

DEFAULT_OPERATING_POINT = "youden"


@dataclass
class OofReport:
    """Calibration (a frame keyed by trial ``number``), reliability curves and operating points
    of the top trials, the ensemble selection, and notes (why something is missing)."""

    calibration: pd.DataFrame
    reliability: list[dict] = field(default_factory=list)
    operating: list[dict] = field(default_factory=list)
    ensemble: dict | None = None
    test: dict | None = None  # the search's test split: best-by-CV trial and ensemble on it
    notes: list[str] = field(default_factory=list)
    n_stored: int = 0


_CAL_COLS = ["number", "ece", "ece_ci_low", "ece_ci_high", "brier", "nll"]


def build_oof_report(
    study: optuna.Study,
    storage: Any,
    board: pd.DataFrame,
    *,
    metric: str,
    positive: str | None,
    top: int = 4,
    point: str | None = DEFAULT_OPERATING_POINT,
    ensemble_rounds: int = ENSEMBLE_ROUNDS,
    n_boot: int = 500,
) -> OofReport:
    """Everything from the out-of-fold predictions of the ranked trials in `board`."""
    damaged: list[str] = []
    oofs = load_study_oof(study, storage, problems=damaged)
    ranked = [int(n) for n in board["number"]] if len(board) else []
    have = [n for n in ranked if n in oofs]
    rep = OofReport(calibration=pd.DataFrame(columns=_CAL_COLS), n_stored=len(have))
    rep.notes.extend(damaged)
    if fixed := [n for n in have if oofs[n].folds_from_splits]:
        rep.notes.append(
            f"out-of-fold predictions of trial(s) {fixed}: each row's fold is taken from the "
            "trial's recorded splits, not from the artifact (written before 2026-12-05, when "
            "the store recomputed patient folds beside site folds' predictions)"
        )
    if not have:
        if ranked:
            rep.notes.append(
                "no stored out-of-fold predictions for the ranked trials (studies run before "
                "they were stored, or a storage without an artifact folder): calibration, "
                "operating points and ensemble selection are not shown"
            )
        return rep
    if len(have) < len(ranked):
        rep.notes.append(
            f"out-of-fold predictions stored for {len(have)} of {len(ranked)} ranked trials; "
            "calibration and ensemble selection use those"
        )
    rows = []
    for n in have:
        v = oofs[n].valid()
        c = calibration_summary(
            v.probs, v.labels, groups=v.groups, classes=v.classes, positive=positive, n_boot=n_boot
        )
        rows.append({"number": n, **{k: c[k] for k in _CAL_COLS[1:]}, "_full": c})
    frame = pd.DataFrame(rows)
    rep.calibration = frame[_CAL_COLS].reset_index(drop=True)
    full = dict(zip(frame["number"], frame["_full"], strict=True))
    rule, target = parse_operating_point(point) if point else (None, None)
    for n in have[:top]:
        v = oofs[n].valid()
        rep.reliability.append({"number": n, **full[n]["reliability"], "ece": full[n]["ece"]})
        if rule is None or positive not in v.classes:
            continue
        k = v.class_index(positive)
        op = _crossfit_point(v, k, rule, target, n_boot)
        if op is None:
            rep.notes.append(
                f"trial {n}: no operating point ({point}): its predictions lack a positive or "
                "a negative row in every cross-fit"
            )
            continue
        op.update(number=n, positive=positive, point=point, fpr=1.0 - op["specificity"])
        rep.operating.append(op)
    if len(have) >= 2:
        rep.ensemble = select_ensemble(
            {n: oofs[n] for n in have}, metric=metric, positive=positive, rounds=ensemble_rounds
        )
    else:
        rep.notes.append("ensemble selection needs at least 2 trials with stored predictions")
    rep.test = score_test_split(study, oofs, ranked, rep.ensemble, metric, positive, n_boot)
    return rep


def _test_figure(test: Any, probs: Any, classes: list[str], metric: str, positive, n_boot):
    """The metric on the test split with its patient-bootstrap 95 % CI, and every scalar."""
    return metric_figure(
        test.labels, probs, classes, metric, positive=positive, groups=test.groups, n_boot=n_boot
    )


def score_test_split(
    study: optuna.Study,
    oofs: dict[int, Any],
    ranked: list[int],
    ensemble: dict | None,
    metric: str,
    positive: str | None,
    n_boot: int = 500,
) -> dict | None:
    """The search's test split (`search --test`): the best-by-cross-validation trial's figure
    on it (its fold models averaged) beside its CV estimate, and the selected ensemble's
    (members' test predictions mixed with the selected weights) beside its nested estimate.
    None when the study has no test split."""
    info = (study.user_attrs.get("protocol") or {}).get("test")
    if not info:
        return None
    out: dict[str, Any] = {"info": info, "metric": metric}
    best = ranked[0] if ranked else None
    o = oofs.get(best) if best is not None else None
    if o is None or o.test is None:
        out["note"] = "the best-by-CV trial has no stored test predictions"
        return out
    trial = study.trials[best]
    cv = ((trial.user_attrs.get("metrics") or {}).get("summary") or {}).get("metrics", {})
    cv_m = cv.get(metric) or {}
    out["best"] = {
        "number": best,
        **_test_figure(o.test, o.test.probs, o.classes, metric, positive, n_boot),
        "cv": {k: cv_m.get(k) for k in ("mean", "ci_low", "ci_high")},
    }
    weights = (ensemble or {}).get("weights") or {}
    if weights and all(int(n) in oofs and oofs[int(n)].test is not None for n in weights):
        mix = sum(oofs[int(n)].test.probs * float(w) for n, w in weights.items())
        nested = ((ensemble or {}).get("nested") or {}).get("ensemble") or {}
        out["ensemble"] = {
            "members": {int(n): float(w) for n, w in weights.items()},
            **_test_figure(o.test, mix, o.classes, metric, positive, n_boot),
            "nested": {k: nested.get(k) for k in ("mean", "ci_low", "ci_high")},
        }
    return out


def _crossfit_point(v: Any, k: int, rule: str, target: float | None, n_boot: int) -> dict | None:
    """The operating point of one trial's out-of-fold predictions, cross-fitted over its
    validation folds: sensitivity/specificity of thresholds chosen on the other folds, with
    the in-sample figures (chosen and scored on all folds) and the in-sample threshold (the one
    `export` would bake in) beside them."""
    parts, how = crossfit_parts(v.labels, v.groups, v.folds)
    try:
        cf = crossfit_operating_point(
            v.probs, v.labels, k, rule, target, v.groups, parts, n_boot=n_boot
        )
    except ConfigError:
        return None
    ins = cf.pop("in_sample")
    return {
        **cf,
        "threshold": ins["threshold"],
        "crossfit": how,
        "in_sample_sensitivity": ins["sensitivity"],
        "in_sample_specificity": ins["specificity"],
        "argmax_sensitivity": ins["argmax_sensitivity"],
        "argmax_specificity": ins["argmax_specificity"],
    }
