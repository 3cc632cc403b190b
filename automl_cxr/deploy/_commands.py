"""What `evaluate`, `export` and `diagnose` do, as functions returning plain dicts (the CLI
only formats them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from automl_cxr.data import external_overlap
from automl_cxr.deploy._evaluate import evaluate_predictions, load_external
from automl_cxr.deploy._export import export_trial, source_roots
from automl_cxr.deploy._predict import ExportedModel, softmax
from automl_cxr.deploy._select import (
    TrialSpec,
    load_study,
    pin_segmenter,
    select_trial,
    training_data,
    trial_spec,
)
from automl_cxr.errors import ConfigError, DataError
from automl_cxr.study import json_safe

__all__ = ["open_trial", "run_diagnose", "run_evaluate", "run_export"]

Log = Callable[[str], None] | None


def open_trial(study: str | Path, study_name: str | None = None, trial: str | int = "best"):
    """(TrialSpec) of the chosen trial of a stored study."""
    s = load_study(study, study_name)
    return trial_spec(s, select_trial(s, trial), storage=study)


def _torch_probs(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(softmax(model(torch.from_numpy(x[i : i + batch])).float().numpy()))
    return np.concatenate(out)


def _control_metric(spec: TrialSpec) -> str:
    """The study's own metric for the lung-blanked control (balanced accuracy when it is a
    cost or a metric the control cannot judge against chance)."""
    from automl_cxr.diagnostics import CONTROL_METRICS

    objectives = list(spec.study_attrs.get("objectives") or [])
    first = next((m for m in objectives if m in CONTROL_METRICS), None)
    return first or "balanced_accuracy"


def run_evaluate(
    data: str | Path,
    *,
    study: str | Path | None = None,
    study_name: str | None = None,
    trial: str | int = "best",
    model_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    label_map: Mapping[str, str] | None = None,
    skip_bad: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    runtime: str = "torchscript",
    log: Log = None,
    drop_overlap: bool = False,
    any_segmenter: bool = False,
) -> dict[str, Any]:
    """Evaluate the chosen trial (retrained on the study's full training data with `fit_full`,
    with the lung segmenter it was searched with: `pin_segmenter`) or an exported model
    (`model_dir`) on an external set.

    Before any model runs, the set is checked with the duplicate finder against the training
    dataset (when it is in the data directory): a copy of a training image or a film of a
    training patient is refused, or left out with `drop_overlap` (listed in the result)."""
    from automl_cxr.settings import resolve_data_dir

    if study is None and model_dir is None:
        raise ConfigError("pass --study STUDY (retrain its trial) or --model DIR (an export)")
    spec: TrialSpec | None = None
    seg_warning = None
    if study is not None:
        spec = open_trial(study, study_name, trial)
        if model_dir is None:
            seg_warning = pin_segmenter(
                spec, resolve_data_dir(data_dir), any_segmenter=any_segmenter
            )
    exported = ExportedModel(model_dir, runtime=runtime) if model_dir is not None else None
    if exported is not None and spec is not None and exported.classes != spec.classes:
        raise DataError(
            f"model {model_dir} predicts {exported.classes}, but study {spec.study_name!r} has "
            f"classes {spec.classes}"
        )
    classes = spec.classes if spec is not None else exported.classes
    positive = spec.positive if spec is not None else exported.config.get("positive")
    resolution = exported.resolution if exported is not None else spec.resolution
    pre = None
    if exported is None:  # a retrained trial runs its roi/intensity levers like the export
        from automl_cxr.lungs import CANVAS, preprocess_for

        _, pre = preprocess_for(spec.train, resolve_data_dir(data_dir), spec.resolution)
        if pre is not None:
            resolution = CANVAS
    ext = load_external(data, classes, resolution, label_map=label_map, skip_bad=skip_bad)
    ext, overlap_check = _check_overlap(
        ext, data, spec, exported, resolve_data_dir(data_dir), drop_overlap, log
    )
    train_shas: set[str] | None = None
    train_sources: dict[str, Any] | None = None
    if exported is not None:
        if log:
            log(f"using the exported model in {model_dir} ({runtime})")
        probs = exported.predict_proba(ext.tensor())
        sha_file = Path(model_dir) / "training_images.sha256"
        if sha_file.is_file():
            train_shas = set(sha_file.read_text().split())
        train_sources = (exported.config.get("training_data") or {}).get("sources")
        model_desc = {"kind": "exported", "dir": str(model_dir), "runtime": runtime}
    else:
        from automl_cxr.engine import fit_full

        dataset = training_data(spec, resolve_data_dir(data_dir))
        if log:
            log(
                f"retraining trial {spec.number} ({spec.model.backbone}) on all {len(dataset)} "
                "training images"
            )
        model = fit_full(dataset, spec.model, spec.train, log=log)
        training = model.training_info  # how long it trained and on which rows (stop rule)
        if pre is not None:
            from automl_cxr.lungs import Preprocessed

            model = Preprocessed(pre, model)
        probs = _torch_probs(model, ext.tensor())
        train_shas = set(dataset.manifest["sha256"].astype(str))
        train_sources = source_roots(dataset.manifest)
        model_desc = {"kind": "retrained", "images": len(dataset), "training": training}
    result = evaluate_predictions(probs, ext, positive=positive, n_boot=n_boot, seed=seed)
    op = exported.operating_point if exported is not None else None
    if op is not None:  # the same images decided at the model's operating point
        decided = np.eye(len(classes))[exported.decide(probs)]
        at_op = evaluate_predictions(decided, ext, positive=positive, n_boot=n_boot, seed=seed)
        result["operating_point"] = {
            **op,
            "metrics": at_op["metrics"],
            "bootstrap": at_op["bootstrap"],
            "note": "decisions thresholded on the positive class; AUC of hard decisions is "
            "not a ranking measure",
        }
    overlap = external_overlap(ext.table, train_shas=train_shas, train_sources=train_sources)
    warnings = [w for w in (overlap["warning"], seg_warning) if w]
    return json_safe(
        {
            "data": str(data),
            "study": spec.describe() if spec is not None else None,
            "model": model_desc,
            "classes": classes,
            "resolution": resolution,
            "label_map": dict(label_map or {}),
            "rejected": ext.rejected,
            **result,
            "overlap": overlap,
            "overlap_check": overlap_check,
            "warnings": warnings
            + ([overlap_check["warning"]] if overlap_check.get("warning") else []),
        }
    )


def _check_overlap(ext, data, spec, exported, data_dir: Path, drop: bool, log: Log):
    """The duplicate finder between the external set and the training dataset (see
    `run_evaluate`); returns the (possibly reduced) set and what the check found."""
    from automl_cxr.data import features_of_files, load_dataset, overlap_pairs, overlap_to_drop

    dataset = None
    if spec is not None:
        dataset = training_data(spec, data_dir)
    else:
        info = exported.config.get("training_data") or {}
        try:
            cand = load_dataset(str(info.get("dataset")), data_dir)
        except DataError:
            cand = None
        if cand is not None and cand.hash in (info.get("manifest_hash"), info.get("hash")):
            dataset = cand
    if dataset is None:
        return ext, {
            "ran": False,
            "warning": "the copy / same-patient check against the training images did not run: "
            "the model's training dataset is not in the data directory (pass --data-dir)",
        }
    paths = ext.table["path"].astype(str).tolist()
    pairs = overlap_pairs(
        features_of_files(paths),
        paths,
        dataset.local_features(),
        dataset.manifest["path"].astype(str).tolist(),
    )
    hit = overlap_to_drop(
        pairs,
        what=str(data),
        images=len(paths),
        dataset=dataset.name,
        drop=drop,
        recorded="listed in the result",
    )
    if hit:
        ext = ext.without(hit)
        if log:
            log(f"left out {len(hit)} image(s) that overlap {dataset.name!r} (--drop-overlap)")
    return ext, {"ran": True, "dataset": dataset.name, "dropped": pairs}


def run_export(
    study: str | Path,
    out_dir: str | Path,
    *,
    study_name: str | None = None,
    trial: str | int = "best",
    data_dir: str | Path | None = None,
    onnx_exporter: str = "auto",
    probe: bool = True,
    ensemble: bool = False,
    calibrate: bool = True,
    operating_point: str | None = None,
    ensemble_select: int | None = None,
    retrain_stop: str = "inner",
    log: Log = None,
    any_segmenter: bool = False,
) -> dict[str, Any]:
    """Retrain the chosen trial on its training data (`retrain_stop`: as `fit_full`'s `stop`;
    or, with `ensemble`, keep its K fold
    models, averaged; with `ensemble_select` N, the Caruana ensemble of N rounds over the
    study's trials) and export it with a model card. `calibrate` bakes in temperature scaling
    and `operating_point` (``sensitivity=0.95``, ``specificity=0.9``, ``youden``) a threshold on
    the positive class, both fitted on the exported object's own predictions on a calibration
    holdout of whole patients it does not train on (see `_clinic`); without either it trains on
    all of the data."""
    from automl_cxr.deploy._clinic import (
        calibrate_export,
        calibration_holdout,
        check_export_options,
        plan_export,
        score_on_test,
    )
    from automl_cxr.deploy._export import train_for_export
    from automl_cxr.deploy._select import search_split
    from automl_cxr.diagnostics import source_diagnostics
    from automl_cxr.settings import resolve_data_dir

    if ensemble and ensemble_select is not None:
        raise ConfigError(
            "--ensemble (fold models) and --ensemble-select (trials) exclude each other"
        )
    from automl_cxr.engine import FIT_STOPS

    if retrain_stop not in FIT_STOPS:
        raise ConfigError(
            f"--retrain-stop must be one of {', '.join(FIT_STOPS)}, but got {retrain_stop!r}"
        )
    s = load_study(study, study_name)
    chosen = select_trial(s, trial)
    spec = trial_spec(s, chosen, storage=study)
    check_export_options(spec, operating_point)  # before any training
    seg_warning = pin_segmenter(spec, resolve_data_dir(data_dir), any_segmenter=any_segmenter)
    dataset, test = search_split(spec, resolve_data_dir(data_dir))
    fit_ds, cal_rows = dataset, None
    if calibrate or operating_point is not None:
        fit_rows, cal_rows = calibration_holdout(dataset, spec.seed)
        fit_ds = dataset.subset(fit_rows, tag=f"export-fit-{spec.seed}")
    plan = plan_export(
        s,
        spec,
        study,
        fit_ds,
        ensemble_select=ensemble_select,
        stop=retrain_stop,
        log=log,
        any_segmenter=any_segmenter,
    )
    if seg_warning:
        plan.warnings.insert(0, seg_warning)
        plan.card["segmenter_warning"] = plan.config["segmenter_warning"] = seg_warning
    diag = None
    if probe:
        diag = source_diagnostics(dataset, resolution=spec.resolution, seed=spec.seed)
    model = plan.model
    if model is None:
        if log:
            held = "" if cal_rows is None else f" ({len(cal_rows)} held out to calibrate it)"
            log(
                f"retraining trial {spec.number} ({spec.model.backbone}) "
                + (
                    f"on each of its {spec.train.n_folds} folds of {len(fit_ds)} images "
                    "(fold ensemble)"
                    if ensemble
                    else f"on {len(fit_ds)} of {len(dataset)} training images"
                )
                + held
            )
        model, _ = train_for_export(spec, fit_ds, ensemble=ensemble, stop=retrain_stop, log=log)
    seen: list[str] = []
    if cal_rows is not None:
        if log:
            log(f"calibrating on the {len(cal_rows)} held-out images")
        calibrate_export(
            plan, model, spec, dataset, cal_rows, calibrate=calibrate, point=operating_point
        )
        seen = dataset.manifest["sha256"].astype(str).to_numpy()[cal_rows].tolist()
        plan.config["calibration_holdout"] = {
            "images": len(cal_rows),
            "patients": int(len(set(np.asarray(dataset.groups)[cal_rows]))),
            "trained_on": len(fit_ds),
        }
    if test is not None:
        if log:
            log(f"scoring the exported model on the study's test split ({len(test)} images)")
        score_on_test(plan, model, spec, test, trial=chosen, storage=study)
    config = export_trial(
        spec,
        fit_ds,
        out_dir,
        model=model,
        diagnostics=diag,
        onnx_exporter=onnx_exporter,
        ensemble=ensemble,
        temperature=plan.temperature,
        card_extra=plan.card,
        config_extra=plan.config,
        seen_images=seen,
        log=log,
    )
    return json_safe(
        {
            "out": str(out_dir),
            "study": spec.describe(),
            "files": sorted(p.name for p in Path(out_dir).iterdir() if p.is_file()),
            "onnx": config["onnx"],
            "checks": config["checks"],
            "ensemble": config.get("ensemble"),
            "calibration": plan.card.get("calibration"),
            "operating_point": plan.card.get("operating_point"),
            "selected_ensemble": plan.card.get("selected_ensemble"),
            "test_split": plan.card.get("test_split"),
            "warnings": (
                (diag or {}).get("warnings")
                or [
                    w
                    for w in [(spec.study_attrs.get("source_label_alignment") or {}).get("warning")]
                    if w
                ]
            )
            + plan.warnings,
        }
    )


def run_diagnose(
    study: str | Path,
    *,
    study_name: str | None = None,
    trial: str | int = "best",
    data_dir: str | Path | None = None,
    control: bool = False,
    blank_fraction: float = 0.6,
    fill: str = "mean",
    probe_size: int = 32,
    log: Log = None,
) -> dict[str, Any]:
    """Alignment, source probe and per-source metrics of the chosen trial; with `control`,
    the lung-blanked control run compared with the trial."""
    from automl_cxr.diagnostics import check_blank, control_run, diagnose_dataset
    from automl_cxr.settings import resolve_data_dir

    if control:
        check_blank(blank_fraction, fill)
    spec = open_trial(study, study_name, trial)
    dataset = training_data(spec, resolve_data_dir(data_dir))
    out = diagnose_dataset(
        dataset,
        resolution=spec.resolution,
        by_source=spec.metrics.get("by_source"),
        probe_size=probe_size,
        seed=spec.seed,
    )
    out["study"] = spec.describe()
    out["control"] = None
    if control:
        if log:
            log(
                f"control run: trial {spec.number} retrained with the central "
                f"{blank_fraction:.0%} x {blank_fraction:.0%} blanked ({fill})"
            )
        out["control"] = control_run(
            dataset,
            spec.model,
            spec.train,
            original=spec.metrics.get("summary"),
            metric=_control_metric(spec),
            fraction=blank_fraction,
            fill=fill,
            log=log,
        )
    return json_safe(out)
