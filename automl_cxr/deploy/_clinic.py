"""What `export` fits after training: Caruana ensemble selection across trials (on the
study's stored out-of-fold predictions), and the temperature and operating point of the object
it exports.

The temperature and the threshold are fitted on the exported object's own predictions on a
calibration holdout: whole patients (about a fifth, stratified) left out of its training
(full retrain, fold ensemble or selected ensemble alike). Out-of-fold predictions of the K
fold models describe other models: a full retrain trains on other data for other epochs and
an average of fold models is softer than each. The card's figures are cross-fitted within the
holdout, the in-sample ones beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from automl_cxr.deploy._select import TrialSpec, pin_segmenter, trial_spec
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.models import WeightedEnsemble
from automl_cxr.oof import (
    apply_temperature,
    choose_threshold,
    crossfit_operating_point,
    crossfit_parts,
    crossfit_temperature,
    fit_temperature,
    load_study_oof,
    parse_operating_point,
    select_ensemble,
)

__all__ = [
    "CHANCE_MARGIN",
    "HOLDOUT_PARTS",
    "ExportPlan",
    "calibrate_export",
    "calibration_holdout",
    "check_export_options",
    "holdout_decisions",
    "holdout_probabilities",
    "plan_export",
    "score_on_test",
]

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
    stop: str,
    log: Log,
    any_segmenter: bool = False,
) -> tuple[WeightedEnsemble, dict[str, Any], dict[str, Any], list[str]]:
    """Caruana selection over the COMPLETE trials with stored predictions and the exported
    trial's input resolution and roi/intensity levers; members retrained on `dataset`
    (`fit_full`, stopped by `stop`)."""
    from automl_cxr.engine import fit_full

    oofs = load_study_oof(study, storage)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}

    def graph_input(train: dict[str, Any]) -> tuple[Any, ...]:
        """What a member's exported graph is fed: its resolution and roi/intensity levers (one
        graph holds every member behind one input, so they must agree)."""
        return (train.get("resolution"), train.get("roi", "full"), train.get("intensity", "none"))

    want = graph_input(spec.train.to_dict())
    same_res = {
        n: o
        for n, o in oofs.items()
        if graph_input((by_number[n].user_attrs.get("config") or {}).get("train") or {}) == want
    }
    if len(same_res) < 1:
        raise StorageError(
            f"--ensemble-select needs stored out-of-fold predictions of complete trials at "
            f"{spec.resolution} px with roi {want[1]!r} and intensity {want[2]!r}; study "
            f"{study.study_name!r} has {len(oofs)} with predictions"
        )
    metric = _primary_metric(spec)
    sel = select_ensemble(same_res, metric=metric, positive=spec.positive, rounds=rounds)
    members, cfgs, warnings = [], [], []
    for n, w in sel["weights"].items():
        mspec = trial_spec(study, by_number[n], storage=storage)
        warned = pin_segmenter(mspec, Path(dataset.root).parent, any_segmenter=any_segmenter)
        warnings += [warned] if warned else []
        if log:
            log(f"ensemble member trial {n} (weight {w:.3f}, {mspec.model.backbone}): retraining")
        members.append(fit_full(dataset, mspec.model, mspec.train, stop=stop, log=log))
        cfgs.append({"trial": n, "weight": w, "model": mspec.model.to_dict()})
    model = WeightedEnsemble(members, [w for _, w in sel["weights"].items()])
    card = {
        **{k: sel[k] for k in ("metric", "n_rounds", "candidates", "score", "nested", "caveat")},
        "best_single": sel["best_single"],
        "best_single_score": sel["best_single_score"],
        "members": [
            {"trial": n, "weight": w, "single_score": sel["single_scores"][n]}
            for n, w in sel["weights"].items()
        ],
    }
    excluded = len(oofs) - len(same_res)
    if excluded:
        card["excluded"] = (
            f"{excluded} trial(s) at another resolution or with other roi/intensity levers"
        )
    return model, card, {"members": cfgs}, warnings


HOLDOUT_PARTS = 5
"""The calibration holdout is one of this many stratified patient groups (about 20 %)."""


def calibration_holdout(dataset: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows the exported model trains on, rows that calibrate it): whole patients, stratified
    by label, the first of `HOLDOUT_PARTS` patient parts (`crossfit_parts`) held out."""
    n = len(np.unique(np.asarray(dataset.groups).astype(str)))
    if n < 2:
        raise ConfigError(
            f"a calibration holdout needs at least 2 patients, but the training data has {n}: "
            "export with --no-calibrate and without --operating-point"
        )
    parts, _ = crossfit_parts(dataset.labels, dataset.groups, n_parts=HOLDOUT_PARTS, seed=seed)
    return np.flatnonzero(parts != 0), np.flatnonzero(parts == 0)


def check_export_options(spec: TrialSpec, point: str | None) -> tuple[str | None, float | None]:
    """The operating point's (rule, target), refused before any work when it is malformed or
    the study has no positive class."""
    rule, target = parse_operating_point(point) if point else (None, None)
    if rule is not None and spec.positive not in spec.classes:
        raise ConfigError(
            f"--operating-point needs the study's positive class, but study "
            f"{spec.study_name!r} has none among {spec.classes}"
        )
    return rule, target


def plan_export(
    study: optuna.Study,
    spec: TrialSpec,
    storage: str | Path,
    dataset: Any,
    *,
    ensemble_select: int | None = None,
    stop: str = "inner",
    log: Log = None,
    any_segmenter: bool = False,
) -> ExportPlan:
    """The selected ensemble of one export (Caruana over the study's out-of-fold predictions,
    members retrained on `dataset`, each with the lung segmenter it was searched with:
    `pin_segmenter`), or an empty plan: the trial's own model."""
    plan = ExportPlan()
    if ensemble_select is not None:
        model, card, cfg, warned = _select(
            study, storage, spec, ensemble_select, dataset, stop, log, any_segmenter
        )
        plan.warnings += warned
        plan.model = model
        plan.card["selected_ensemble"] = card
        plan.config["selected_ensemble"] = cfg
    return plan


def holdout_probabilities(
    model: Any, spec: TrialSpec, dataset: Any, rows: np.ndarray
) -> np.ndarray:
    """The exported object's probabilities on `rows` of `dataset`: the module every exported
    graph computes (levers included, no temperature yet) on the images as `predict` feeds
    them (decoded, resized, 0..1)."""
    import torch

    from automl_cxr.deploy._export import deployable

    module, resolution, _ = deployable(model, spec, dataset)
    images = np.asarray(dataset.images(resolution))[rows]
    if images.ndim == 3:  # the cache holds (N, R, R); graphs take (B, 1, R, R)
        images = images[:, None]
    module = module.eval().cpu()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            x = torch.from_numpy(images[i : i + 32].astype(np.float32) / 255.0)
            out.append(torch.softmax(module(x).float(), dim=1).numpy())
    probs = np.concatenate(out).astype(np.float64)
    return probs / probs.sum(axis=1, keepdims=True)  # float32 softmax: sums off by ~1e-7


def score_on_test(
    plan: ExportPlan,
    model: Any,
    spec: TrialSpec,
    test: Any,
    *,
    trial: FrozenTrial,
    storage: str | Path,
    n_boot: int = 1000,
) -> None:
    """The study's test split (`search --test`, never seen by the search) in the card: the
    exported object's figure on it (temperature included, arg-max decisions) and the trial's
    own fold models' (stored by the search), each with a patient-bootstrap 95 % CI."""
    from automl_cxr.engine import metric_figure
    from automl_cxr.oof import load_oof

    metric = _primary_metric(spec)
    to_study = np.array([spec.classes.index(c) for c in test.classes], dtype=np.int64)
    labels = to_study[np.asarray(test.labels)]

    def figure(probs: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
        return metric_figure(
            labels, probs, spec.classes, metric, positive=spec.positive, groups=groups,
            n_boot=n_boot,
        )  # fmt: skip

    probs = holdout_probabilities(model, spec, test, np.arange(len(test)))
    if plan.temperature is not None:
        probs = apply_temperature(probs, plan.temperature)
    info = (spec.study_attrs.get("protocol") or {}).get("test") or {}
    out: dict[str, Any] = {
        "spec": info.get("spec"),
        "images": len(test),
        "patients": int(len(set(np.asarray(test.groups)))),
        "classes": info.get("classes"),
        "metric": metric,
        "exported": figure(probs, np.asarray(test.groups)),
    }
    oof = load_oof(trial, storage)
    if oof is not None and oof.test is not None and len(oof.test.labels) == len(test):
        out["trial_fold_models"] = figure(oof.test.probs, oof.test.groups)
    plan.card["test_split"] = out


CHANCE_MARGIN = 0.05
"""An exported model whose balanced accuracy on its calibration holdout is within this of chance
(1 / the classes the holdout holds) is reported as degenerate."""


def holdout_decisions(
    probs: np.ndarray, labels: np.ndarray, classes: list[str]
) -> tuple[dict[str, Any], str | None]:
    """The exported model's arg-max decisions on its calibration holdout: balanced accuracy,
    the share of each predicted class, and a warning when they are no better than chance.

    A retrain with `--retrain-stop cv_epochs` stops after a fixed number of epochs (what its
    folds' early stopping chose), not at a validated best epoch; a configuration whose training
    oscillates (measured with `group_dro`: a linear head that calls 99 % of films COVID-19
    after epoch 2 of 3) can land on a model that the cross-validation estimate says nothing
    about. The default inner stop makes this unlikely; the check catches what remains."""
    from sklearn.metrics import balanced_accuracy_score

    pred = probs.argmax(axis=1)
    held = np.unique(labels)
    bacc = float(balanced_accuracy_score(labels, pred)) if len(held) > 1 else float("nan")
    share = {c: float(np.mean(pred == k)) for k, c in enumerate(classes)}
    info = {"balanced_accuracy": bacc, "predicted_share": share, "n": int(len(labels))}
    chance = 1.0 / max(len(held), 1)
    if len(held) < 2 or bacc > chance + CHANCE_MARGIN:
        return info, None
    top = max(share, key=share.get)
    return info, (
        f"the exported model is no better than chance on its calibration holdout (balanced "
        f"accuracy {bacc:.3f}, chance {chance:.3f}; it calls {share[top]:.0%} of the "
        f"{len(labels)} held-out images {top!r}): this configuration landed on a degenerate "
        "model, which its cross-validation estimate does not describe. Export its fold models "
        "instead (--ensemble: each stopped at its best epoch) or another trial (--trial)"
    )


def calibrate_export(
    plan: ExportPlan,
    model: Any,
    spec: TrialSpec,
    dataset: Any,
    rows: np.ndarray,
    *,
    calibrate: bool,
    point: str | None,
    n_boot: int = 500,
) -> None:
    """Fit the temperature and the operating point of the exported object on its calibration
    holdout `rows` (patients it never trained on) and describe them in `plan`: the figures are
    cross-fitted within the holdout (fitted on four of five patient parts, scored on the
    fifth), the in-sample ones beside them, labelled."""
    rule, target = check_export_options(spec, point)
    probs = holdout_probabilities(model, spec, dataset, rows)
    labels = np.asarray(dataset.labels)[rows]
    plan.card["holdout_decisions"], warning = holdout_decisions(probs, labels, spec.classes)
    if warning:
        plan.warnings.append(warning)
    groups = np.asarray(dataset.groups)[rows]
    parts, how = crossfit_parts(labels, groups, seed=spec.seed)
    n_groups = len(np.unique(groups))
    what = (
        f"a calibration holdout of {len(rows)} images from {n_groups} patients (about "
        f"1/{HOLDOUT_PARTS} of the training patients, stratified), which the exported model "
        "never trained on"
    )
    calibrated = probs
    scaled = False
    if calibrate:
        t = fit_temperature(probs, labels)["temperature"]
        cf = crossfit_temperature(probs, labels, groups, parts, n_boot=n_boot, seed=spec.seed)
        # Baked in only when it helps on held-out patients: a temperature that raises the
        # cross-fitted NLL would make the exported probabilities worse, not better.
        scaled = cf["after"]["nll"] <= cf["before"]["nll"]
        if scaled:
            plan.temperature = t
            calibrated = apply_temperature(probs, t)
        else:
            plan.warnings.append(
                f"temperature scaling not applied: on held-out patients it raised the NLL "
                f"({cf['before']['nll']:.4f} → {cf['after']['nll']:.4f}, cross-fitted)"
            )
        plan.card["calibration"] = {
            "method": "temperature scaling",
            "temperature": t,
            "applied": scaled,
            "fitted_on": what,
            "object": "the exported model itself (its own predictions on the holdout)",
            "crossfit": how,
            "before": cf["before"],
            "after": cf["after"],
            "after_in_sample": cf["in_sample_after"],
            "per_part": cf["per_part"],
        }
    if rule is not None:
        k = spec.classes.index(spec.positive)
        cf_op = crossfit_operating_point(
            probs, labels, k, rule, target, groups, parts, temperature=scaled, n_boot=n_boot
        )
        ins = cf_op.pop("in_sample")
        threshold = choose_threshold(calibrated[:, k], labels == k, rule, target)
        op = {
            **cf_op,
            "threshold": threshold,
            "positive": spec.positive,
            "calibrated": scaled,
            "chosen_on": what,
            "crossfit": how,
            "in_sample": ins,
            "argmax_sensitivity": ins["argmax_sensitivity"],
            "argmax_specificity": ins["argmax_specificity"],
        }
        plan.card["operating_point"] = op
        plan.config["operating_point"] = {
            "rule": rule,
            "target": target,
            "positive": spec.positive,
            "threshold": threshold,
            "sensitivity": op["sensitivity"],
            "specificity": op["specificity"],
        }
