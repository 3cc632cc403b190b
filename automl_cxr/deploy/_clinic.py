"""What `export` takes from the study's stored out-of-fold predictions: temperature scaling,
an operating point on the positive class, and Caruana ensemble selection across trials.

Everything is fitted on out-of-fold predictions of the study's trials (never on data the card
reports as external), then baked into the exported graph (temperature) and its config
(threshold), and described in the model card.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from automl_cxr.deploy._graphs import WeightedEnsemble
from automl_cxr.deploy._select import TrialSpec, trial_spec
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.oof import (
    apply_temperature,
    calibration_summary,
    caruana_select,
    fit_temperature,
    load_oof,
    load_study_oof,
    metric_scorer,
    nested_selection,
    operating_point,
    parse_operating_point,
)

__all__ = ["ExportPlan", "plan_export"]

Log = Callable[[str], None] | None


@dataclass
class ExportPlan:
    """The extras of one export: a selected-ensemble model (or None: the trial's own), the
    temperature to bake in, and what goes into the card and config.json."""

    model: Any = None
    temperature: float | None = None
    card: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _primary_metric(spec: TrialSpec) -> str:
    from automl_cxr.study import OBJECTIVE_KEYS

    return next((m for m in spec.objectives if m not in OBJECTIVE_KEYS), "balanced_accuracy")


def _select(
    study: optuna.Study,
    storage: str | Path,
    spec: TrialSpec,
    rounds: int,
    dataset: Any,
    log: Log,
) -> tuple[WeightedEnsemble, dict[str, Any], dict[str, Any], np.ndarray, Any]:
    """Caruana selection over the COMPLETE trials with stored predictions and the exported
    trial's input resolution; members retrained on all the training data."""
    from automl_cxr.engine import fit_full

    oofs = load_study_oof(study, storage)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    same_res = {
        n: o
        for n, o in oofs.items()
        if ((by_number[n].user_attrs.get("config") or {}).get("train") or {}).get("resolution")
        == spec.resolution
    }
    if len(same_res) < 1:
        raise StorageError(
            f"--ensemble-select needs stored out-of-fold predictions of complete trials at "
            f"{spec.resolution} px; study {study.study_name!r} has {len(oofs)} with predictions"
        )
    first = next(iter(same_res.values())).valid()
    probs = {n: o.valid().probs for n, o in same_res.items()}
    metric = _primary_metric(spec)
    scorer = metric_scorer(metric, first.classes, spec.positive)
    sel = caruana_select(probs, first.labels, first.folds, scorer, n_rounds=rounds)
    nested = nested_selection(probs, first.labels, first.folds, scorer, n_rounds=rounds)
    members, cfgs = [], []
    for n, w in sel["weights"].items():
        mspec = trial_spec(study, by_number[n], storage=storage)
        if log:
            log(f"ensemble member trial {n} (weight {w:.3f}, {mspec.model.backbone}): retraining")
        members.append(fit_full(dataset, mspec.model, mspec.train, log=log))
        cfgs.append({"trial": n, "weight": w, "model": mspec.model.to_dict()})
    model = WeightedEnsemble(members, [w for _, w in sel["weights"].items()])
    mixed = sum(probs[n] * w for n, w in sel["weights"].items())
    card = {
        "metric": metric,
        "n_rounds": rounds,
        "candidates": len(probs),
        "score": sel["score"],
        "best_single": sel["best_single"],
        "best_single_score": sel["best_single_score"],
        "members": [
            {"trial": n, "weight": w, "single_score": sel["single_scores"][n]}
            for n, w in sel["weights"].items()
        ],
        "nested": nested,
        "caveat": (
            "selected and scored on the same out-of-fold predictions, so optimistic; the nested "
            "estimate is the honest one"
        ),
    }
    excluded = len(oofs) - len(same_res)
    if excluded:
        card["excluded"] = f"{excluded} trial(s) at another resolution"
    return model, card, {"members": cfgs}, mixed, first


def plan_export(
    study: optuna.Study,
    trial: FrozenTrial,
    spec: TrialSpec,
    storage: str | Path,
    dataset: Any,
    *,
    calibrate: bool = True,
    point: str | None = None,
    ensemble_select: int | None = None,
    log: Log = None,
) -> ExportPlan:
    """Temperature, operating point and (optionally) a selected ensemble for one export."""
    plan = ExportPlan()
    rule, target = parse_operating_point(point) if point else (None, None)
    if rule is not None and spec.positive not in spec.classes:
        raise ConfigError(
            f"--operating-point needs the study's positive class, but study "
            f"{spec.study_name!r} has none among {spec.classes}"
        )
    if ensemble_select is not None:
        model, card, cfg, probs, rows = _select(study, storage, spec, ensemble_select, dataset, log)
        plan.model = model
        plan.card["selected_ensemble"] = card
        plan.config["selected_ensemble"] = cfg
        what = "the selected ensemble's weighted out-of-fold predictions"
    else:
        oof = load_oof(trial, storage, required=rule is not None)
        if oof is None:
            if calibrate:
                plan.warnings.append(
                    f"trial {trial.number} has no stored out-of-fold predictions: exported "
                    "without temperature scaling"
                )
            return plan
        rows = oof.valid()
        probs = rows.probs
        what = f"trial {trial.number}'s pooled out-of-fold predictions"
    calibrated = probs
    if calibrate:
        fit = fit_temperature(probs, rows.labels)
        t = fit["temperature"]
        calibrated = apply_temperature(probs, t)
        plan.temperature = t
        keep = ("ece", "ece_ci_low", "ece_ci_high", "brier", "nll", "n", "n_groups", "n_bins")
        before = calibration_summary(probs, rows.labels, groups=rows.groups)
        after = calibration_summary(calibrated, rows.labels, groups=rows.groups)
        plan.card["calibration"] = {
            "method": "temperature scaling",
            "temperature": t,
            "fitted_on": f"{what} ({len(rows.labels)} images, never the reported external data)",
            "before": {k: before[k] for k in keep},
            "after": {k: after[k] for k in keep},
        }
    if rule is not None:
        k = spec.classes.index(spec.positive)
        op = operating_point(calibrated, rows.labels, k, rule, target, groups=rows.groups)
        op.update(positive=spec.positive, calibrated=calibrate, chosen_on=what)
        plan.card["operating_point"] = op
        plan.config["operating_point"] = {
            "rule": rule,
            "target": target,
            "positive": spec.positive,
            "threshold": op["threshold"],
            "sensitivity": op["sensitivity"],
            "specificity": op["specificity"],
        }
    return plan
