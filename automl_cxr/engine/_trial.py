"""One configuration, one dataset: patient-grouped CV, training, metrics — `run_trial`."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from automl_cxr.data import PreparedDataset, mapped_copy_on_write
from automl_cxr.engine._config import TrainConfig
from automl_cxr.engine._features import FeatureCache
from automl_cxr.engine._folds import dataset_sites, row_identities, trial_splits
from automl_cxr.engine._inference import bootstrap_metrics, summarize_folds
from automl_cxr.engine._latency import latency_once
from automl_cxr.engine._metrics import compute_metrics, roc_curves
from automl_cxr.engine._session import Fit, Reporter, Session
from automl_cxr.engine._splits import members_hash
from automl_cxr.errors import ConfigError, DataError
from automl_cxr.models import CxrModel, ModelConfig

__all__ = ["FIT_STOPS", "TrialResult", "fit_folds", "fit_full", "run_trial"]


@dataclass
class TrialResult:
    """Everything a study records about one trained and evaluated configuration."""

    dataset: str
    dataset_hash: str
    classes: list[str]
    metric: str
    model_config: dict
    train_config: dict
    summary: dict  # summarize_folds(): metrics.<name>.{mean, std, ci_low, ci_high, folds}
    folds: list[dict]  # compute_metrics() of each fold, plus epochs_run, best_epoch, n_train/n_val
    pooled: dict  # compute_metrics() of all out-of-fold predictions together
    by_source: dict  # the same, per image source (a shortcut shows up as a gap between them)
    roc: dict  # one-vs-rest ROC curves of the pooled out-of-fold predictions
    curves: list[list[dict]]  # per fold, per epoch: train_loss, val_loss, value[, inner_val_loss]
    params_total: int
    params_trainable: int
    latency_ms: float
    train_seconds: float
    images_per_second: float
    device: str
    feature_cache: dict
    weight_source: dict
    external: dict | None = None  # the first of `externals` (the old single `external=`)
    splits: list[dict] = field(default_factory=list)  # per fold: members used (see run_trial)
    externals: dict[str, dict] = field(default_factory=dict)  # name -> metrics, bootstrap, n, ...
    full_fit_epochs: int | None = None  # epochs fit_full trains for (what the CV used)
    warnings: list[str] = field(default_factory=list)  # e.g. a site-CV fold-count fallback
    precision: str = "fp32"  # what convolutions and matmuls ran in: fp32, bf16 or fp16 (amp)
    # wall seconds: setup (model, images, cached features), fit (training and per-epoch
    # evaluation, all folds), rest (metrics, ROC, external sets, latency), total
    timing: dict = field(default_factory=dict)
    # pooled out-of-fold probabilities (N, C), rows in the dataset manifest's order; NaN rows
    # were never validated (e.g. max_folds < n_folds). Stored once per trial (study/_oof.py).
    oof_probs: np.ndarray | None = field(default=None, repr=False)
    # the validation fold (index into `splits`) of each row, -1 where never validated: the
    # folds this trial actually used, stored beside `oof_probs` (never recomputed elsewhere)
    oof_folds: np.ndarray | None = field(default=None, repr=False)
    # the roi/intensity preprocessing: its cache key and, per dataset, images that fell back
    # to `full` because no plausible lungs were found (never dropped)
    preprocess: dict = field(default_factory=dict)
    # the fold models' averaged probabilities on the search's test split (`run_trial(test=)`),
    # rows in the test set's manifest order; stored beside the out-of-fold predictions and
    # never recorded as a user attribute, so nothing can rank trials by it
    test_probs: np.ndarray | None = field(default=None, repr=False)

    @property
    def value(self) -> float:
        """The mean over folds of the trial's metric (the study objective)."""
        return float(self.summary["metrics"][self.metric]["mean"])

    def epoch_rates(self) -> tuple[float, float]:
        """Training images/s of the first fold's first epoch and of its later epochs (the
        steady state: the first epoch of a process pays one-off start-up costs such as
        oneDNN/cuDNN kernel selection and allocator growth)."""
        pts = self.curves[0]
        later = pts[1:] or pts
        return (
            round(pts[0]["n_train"] / pts[0]["train_seconds"], 2),
            round(sum(p["n_train"] for p in later) / sum(p["train_seconds"] for p in later), 2),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _fold_record(
    dataset: PreparedDataset, ids: np.ndarray, sp, fit: Fit, cfg: TrainConfig, sites
) -> dict:
    """What a fold used, comparable across processes: sizes, hashes of its members, indices."""
    rec = {
        "fold": int(sp.fold),
        "n_train": int(len(sp.train)),
        "n_val": int(len(sp.val)),
        "train_hash": members_hash(ids, sp.train),
        "val_hash": members_hash(ids, sp.val),
        "val_indices": [int(i) for i in sp.val],
        "inner_val_indices": (
            None if fit.inner_val_idx is None else [int(i) for i in fit.inner_val_idx]
        ),
        "trained_hash": members_hash(ids, fit.trained),
        "n_trained_images": int(len(fit.trained)),
        "epochs_run": fit.epochs_run,
        "best_epoch": int(fit.best_epoch),
        "cv": cfg.cv,
    }
    if fit.group_weights is not None:
        rec["group_weights"] = fit.group_weights
    if sites is not None:
        rec["val_sites"] = sorted(set(sites[sp.val].tolist()))
    return rec


def _full_fit_epochs(cfg: TrainConfig, fits: list[Fit]) -> int:
    """Epochs for a model trained on all data: `cfg.epochs`, or with early stopping the median
    over folds of the chosen epoch count (best_epoch + 1), rounded half up."""
    if cfg.early_stopping is None or not fits:
        return cfg.epochs
    return max(1, int(math.floor(float(np.median([f.best_epoch + 1 for f in fits])) + 0.5)))


def fit_full(
    dataset: PreparedDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    epochs: int | None = None,
    stop: str = "inner",
    feature_cache: FeatureCache | None = None,
    log: Callable[[str], None] | None = None,
) -> CxrModel:
    """Train one configuration on `dataset` (for export); returns the model in eval mode on
    the CPU.

    How long it trains: `epochs` if given (e.g. a trial's `TrialResult.full_fit_epochs`), else
    `cfg.epochs` without early stopping (as every fold trained). With early stopping, `stop`
    decides. "inner" (the default) trains as each cross-validation fold did: an inner split of
    `cfg.inner_holdout` of the patients stops it and the epoch with the best inner loss is
    kept — a fixed epoch count is no validated choice when training oscillates (group DRO can
    swing its group weights from one epoch to the next: a retrain for the folds' median epoch
    count once called 99 % of films one class, ROBUST.md §8). "cv_epochs" trains on every
    image for the median of the epoch counts the folds chose (the folds are trained as in
    `run_trial` first). The learning-rate schedule spans `cfg.epochs` and is cut where
    training stops, as it was in the folds. The model's `training_info` says which:
    `{"epochs", "epochs_from": "argument" | "config" | "cv_early_stopping" |
    "inner_early_stopping", "fold_epochs", "n_trained_images", "trained_hash"}`.
    """
    if stop not in FIT_STOPS:
        raise ConfigError(f"stop must be one of {list(FIT_STOPS)}, but got {stop=}")
    cfg = train_config
    session = Session(dataset, model_config, cfg, feature_cache=feature_cache, log=log)
    rows = np.arange(len(dataset))
    if stop == "inner" and cfg.early_stopping is not None and epochs is None:
        if log:
            log(
                f"training on {len(dataset)} images, stopped by an inner split of "
                f"{cfg.inner_holdout:.0%} of the patients (as each fold was)"
            )
        fit = session.fit(rows, None, inner=True)
        info = {
            "epochs": int(fit.best_epoch + 1),
            "epochs_from": "inner_early_stopping",
            "fold_epochs": None,
            "epochs_run": int(fit.epochs_run),
            "inner_holdout_images": int(len(fit.inner_val_idx)),
            "inner_val_loss": float(fit.curve[fit.best_epoch]["inner_val_loss"]),
        }
    else:
        n, source, fold_epochs = _fixed_epochs(session, dataset, cfg, epochs)
        if log:
            log(f"training on all {len(dataset)} images for {n} epochs ({source})")
        fit = session.fit(rows, None, epochs=n)
        info = {"epochs": int(n), "epochs_from": source, "fold_epochs": fold_epochs}
    model = session.model.eval().to("cpu").to(memory_format=torch.contiguous_format)
    model.training_info = {
        **info,
        "n_trained_images": int(len(fit.trained)),
        "trained_hash": members_hash(row_identities(dataset), fit.trained),
    }
    return model


FIT_STOPS = ("cv_epochs", "inner")
"""How `fit_full` decides when to stop (its `stop` argument)."""


def _fixed_epochs(
    session: Session, dataset: PreparedDataset, cfg: TrainConfig, epochs: int | None
) -> tuple[int, str, list[int] | None]:
    """(epochs, where they come from, the folds' chosen epochs) of a fixed-length full fit."""
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer of at least 1, but got epochs={epochs!r}")
        return epochs, "argument", None
    if cfg.early_stopping is None:
        return cfg.epochs, "config", None
    splits, _ = trial_splits(dataset, cfg)
    fits = [
        session.fit(sp.train, sp.val, fold=fi, n_folds=len(splits)) for fi, sp in enumerate(splits)
    ]
    return _full_fit_epochs(cfg, fits), "cv_early_stopping", [f.best_epoch + 1 for f in fits]


def fit_folds(
    dataset: PreparedDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    feature_cache: FeatureCache | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[CxrModel], list[dict]]:
    """Train one configuration on each cross-validation fold exactly as `run_trial` does (same
    grouped splits, seed and early stopping) and keep the fold models (each at its chosen
    epoch); returns the models (eval mode, CPU) and each one's metrics on its own validation
    fold."""
    cfg = train_config
    session = Session(dataset, model_config, cfg, feature_cache=feature_cache, log=log)
    splits, _ = trial_splits(dataset, cfg)
    models: list[CxrModel] = []
    fold_metrics: list[dict] = []
    for fi, sp in enumerate(splits):
        if log:
            log(f"fold {fi + 1}/{len(splits)}: training on {len(sp.train)} images")
        fit = session.fit(sp.train, sp.val, fold=fi, n_folds=len(splits))
        m = fit.metrics
        m["epochs_run"], m["best_epoch"] = fit.epochs_run, fit.best_epoch
        m["n_train"], m["n_val"] = len(sp.train), len(sp.val)
        fold_metrics.append(m)
        member = copy.deepcopy(session.model).eval().to("cpu")
        models.append(member.to(memory_format=torch.contiguous_format))
    return models, fold_metrics


def _external_labels(external: PreparedDataset, classes: list[str]) -> np.ndarray:
    """The external set's labels as indices into the study's `classes` (a subset is fine)."""
    extra = [c for c in external.classes if c not in classes]
    if extra:
        raise DataError(
            f"external set {external.name!r} has classes {external.classes}, the study has "
            f"{classes}: {extra} are not among the study's; map its labels first "
            "(e.g. --label-map normal=non_covid)"
        )
    to_study = np.array([classes.index(c) for c in external.classes], dtype=np.int64)
    return to_study[np.asarray(external.labels, dtype=np.int64)]


def run_trial(
    dataset: PreparedDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    metric: str = "balanced_accuracy",
    report: Reporter | None = None,
    feature_cache: FeatureCache | None = None,
    external: PreparedDataset | None = None,
    externals: Sequence[PreparedDataset] = (),
    test: PreparedDataset | None = None,
    log: Callable[[str], None] | None = None,
    share_from: int | None = None,
    time_limit: float | None = None,
) -> TrialResult:
    """Train and evaluate one configuration with grouped cross-validation (`cfg.cv`: by patient,
    or by acquisition site).

    Metrics are computed per validation fold (at the epoch early stopping chose on an inner
    split of the training patients, or the last one) and summarised as mean, std and a
    corrected resampled t 95 % CI over folds. `externals` (and the older single `external`)
    are each evaluated once at the end with the ensemble of the fold models (average of their
    probabilities) and never used for any choice; an external's classes may be a subset of the
    study's. `test` (the search's test split) is predicted the same way into `test_probs` and
    nothing else: no metric of it is computed or recorded here. `splits` records per fold:
    `fold`, `n_train`, `n_val`, `train_hash`, `val_hash` (sha256 over the members' image
    hashes, see `row_identities`), `val_indices`,
    `inner_val_indices` (None without early stopping), `trained_hash` / `n_trained_images`
    (the rows actually fed to training), `epochs_run`, `best_epoch`, `cv` and, with
    `cv="site"`, `val_sites`. `time_limit` (seconds, from the start) fails the trial with
    `TrialFailed(kind="timeout")` at the first training step past it. `share_from` (the
    shallowest frozen depth a search draws for this backbone) only changes how cached features
    are computed, never the results.
    """
    cfg = train_config
    classes = dataset.classes
    ext_sets = ([external] if external is not None else []) + list(externals)
    ext_y = [_external_labels(e, classes) for e in ext_sets]
    if test is not None:
        _external_labels(test, classes)  # its classes must be the study's
    started = time.perf_counter()
    splits, warnings = trial_splits(dataset, cfg)
    sites = dataset_sites(dataset)[0] if cfg.cv == "site" else None
    session = Session(
        dataset, model_config, cfg, feature_cache=feature_cache, log=log, share_from=share_from
    )
    if time_limit is not None:  # from the start of the trial; checked before every step
        begun = time.monotonic() - (time.perf_counter() - started)
        session.deadline = (begun + float(time_limit), float(time_limit))
    model, device = session.model, session.device
    total_params, trainable_params = model.param_counts()
    y_all = dataset.labels
    ids = row_identities(dataset)
    fold_metrics: list[dict] = []
    curves: list[list[dict]] = []
    records: list[dict] = []
    fits: list[Fit] = []
    oof = np.full((len(dataset), len(classes)), np.nan, dtype=np.float64)
    oof_folds = np.full(len(dataset), -1, dtype=np.int8)
    predicted = ext_sets + ([test] if test is not None else [])  # by every fold's model
    ext_images = [
        torch.from_numpy(mapped_copy_on_write(session.dataset_images(e))).unsqueeze(1).to(device)
        for e in predicted
    ]
    ext_probs: list[list[np.ndarray]] = [[] for _ in predicted]
    setup_seconds = time.perf_counter() - started
    for w in warnings:
        if log:
            log(f"warning: {w}")
    for fi, sp in enumerate(splits):
        fit = session.fit(
            sp.train, sp.val, fold=fi, n_folds=len(splits), metric=metric, report=report
        )
        oof[sp.val] = fit.probs
        oof_folds[sp.val] = fi
        m = fit.metrics
        m["epochs_run"], m["best_epoch"] = fit.epochs_run, fit.best_epoch
        m["n_train"], m["n_val"] = len(sp.train), len(sp.val)
        fold_metrics.append(m)
        curves.append(fit.curve)
        fits.append(fit)
        records.append(_fold_record(dataset, ids, sp, fit, cfg, sites))
        for k, imgs in enumerate(ext_images):
            ext_probs[k].append(session.predict(imgs))  # this fold's model (chosen epoch)
    train_time = sum(f.seconds for f in fits)
    n_trained = sum(f.n_trained for f in fits)

    seen = ~np.isnan(oof).any(axis=1)
    pooled = compute_metrics(y_all[seen], oof[seen], classes, positive=dataset.positive)
    sources = dataset.manifest["source"].to_numpy()
    by_source = {
        str(src): compute_metrics(
            y_all[seen & (sources == src)],
            oof[seen & (sources == src)],
            classes,
            positive=dataset.positive,
        )
        for src in sorted(set(sources[seen]))
    }
    test_probs = np.mean(ext_probs.pop(), axis=0) if test is not None else None
    ext_results: dict[str, dict] = {}
    for e, y_e, probs_e in zip(ext_sets, ext_y, ext_probs, strict=True):
        p = np.mean(probs_e, axis=0)
        name, k = e.name, 2
        while name in ext_results:
            name, k = f"{e.name}_{k}", k + 1
        ext_results[name] = {
            "dataset": e.name,
            "dataset_hash": e.hash,
            "n": int(len(e)),
            "classes": list(e.classes),
            "metrics": compute_metrics(y_e, p, classes, positive=dataset.positive),
            "bootstrap": bootstrap_metrics(
                y_e, p, classes, positive=dataset.positive, groups=e.groups
            ),
        }
    latency = latency_once(
        model, model_config, cfg.resolution, device, session.autocast, session.precision
    )
    result = TrialResult(
        dataset=dataset.name,
        dataset_hash=dataset.hash,
        classes=classes,
        metric=metric,
        model_config=model_config.to_dict(),
        train_config=cfg.to_dict(),
        summary=summarize_folds(fold_metrics),
        folds=fold_metrics,
        pooled=pooled,
        by_source=by_source,
        roc=roc_curves(y_all[seen], oof[seen], classes),
        curves=curves,
        params_total=int(total_params),
        params_trainable=int(trainable_params),
        latency_ms=round(latency, 3),
        train_seconds=round(train_time, 3),
        images_per_second=round(n_trained / train_time, 2) if train_time > 0 else 0.0,
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        precision=session.precision,
        feature_cache=session.cache_info,
        weight_source=session.weight_info,
        external=next(iter(ext_results.values())) if external is not None else None,
        splits=records,
        externals=ext_results,
        full_fit_epochs=_full_fit_epochs(cfg, fits),
        warnings=warnings,
        oof_probs=oof,
        oof_folds=oof_folds,
        preprocess=session.pp_info,
        test_probs=test_probs,
    )
    total = time.perf_counter() - started
    fit_seconds = sum(f.wall for f in fits)
    result.timing = {
        "setup": round(setup_seconds, 4),
        "fit": round(fit_seconds, 4),
        "rest": round(total - setup_seconds - fit_seconds, 4),
        "total": round(total, 4),
    }
    if metric not in result.summary["metrics"]:
        raise ConfigError(
            f"metric {metric!r} is not computed for this dataset; "
            f"allowed: {sorted(result.summary['metrics'])}"
        )
    return result
