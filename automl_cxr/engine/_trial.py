"""One configuration, one dataset: patient-grouped CV, training, metrics — `run_trial`."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from automl_cxr.data import PreparedDataset
from automl_cxr.engine._augment import augment_batch
from automl_cxr.engine._config import TrainConfig
from automl_cxr.engine._features import FeatureCache, feature_key
from automl_cxr.engine._metrics import (
    bootstrap_metrics,
    compute_metrics,
    roc_curves,
    scalar_metrics,
    summarize_folds,
)
from automl_cxr.engine._splits import make_splits
from automl_cxr.errors import ConfigError, DataError, TrialFailed
from automl_cxr.models import CxrModel, ModelConfig, build_model

__all__ = ["Reporter", "TrialResult", "fit_folds", "fit_full", "resolve_device", "run_trial"]

Reporter = Callable[[int, float], None]
"""`report(step, value)`: called after every epoch (step = fold * epochs + epoch) with the
validation value of the trial's metric; it may raise (e.g. optuna.TrialPruned) to stop."""


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
    folds: list[dict]  # compute_metrics() of each fold, plus epochs_run
    pooled: dict  # compute_metrics() of all out-of-fold predictions together
    by_source: dict  # the same, per image source (a shortcut shows up as a gap between them)
    roc: dict  # one-vs-rest ROC curves of the pooled out-of-fold predictions
    curves: list[list[dict]]  # per fold, per epoch: train_loss, val_loss, value
    params_total: int
    params_trainable: int
    latency_ms: float
    train_seconds: float
    images_per_second: float
    device: str
    feature_cache: dict
    weight_source: dict
    external: dict | None = None
    splits: list[dict] = field(default_factory=list)
    # pooled out-of-fold probabilities (N, C), rows in the dataset manifest's order; NaN rows
    # were never validated (e.g. max_folds < n_folds). Stored once per trial (study/_oof.py).
    oof_probs: np.ndarray | None = field(default=None, repr=False)

    @property
    def value(self) -> float:
        """The mean over folds of the trial's metric (the study objective)."""
        return float(self.summary["metrics"][self.metric]["mean"])

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available here")
    return dev


def _predict(net: nn.Module, x: torch.Tensor, prep, batch: int, autocast) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode(), autocast():
        for i in range(0, len(x), batch):
            out.append(torch.softmax(net(prep(x[i : i + batch], False)).float(), dim=1))
    return torch.cat(out).cpu().numpy()


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "step":
            e = step / steps_per_epoch
            return 0.1 ** (int(e >= 0.5 * cfg.epochs) + int(e >= 0.75 * cfg.epochs))
        return 1.0

    return f


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _latency_ms(model: nn.Module, resolution: int, device: torch.device, autocast) -> float:
    model.eval()
    x = torch.rand(1, 1, resolution, resolution, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode(), autocast():
        for i in range(7):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


class _Session:
    """The state one configuration trains from: device, model and its initial weights, the
    images (or cached frozen features) on the device, and the random generator."""

    def __init__(
        self,
        dataset: PreparedDataset,
        model_config: ModelConfig,
        cfg: TrainConfig,
        *,
        feature_cache: FeatureCache | None,
        log: Callable[[str], None] | None,
    ) -> None:
        classes = dataset.classes
        if model_config.num_classes != len(classes):
            raise ConfigError(
                f"num_classes must equal the dataset's {len(classes)} classes {classes}, "
                f"but got num_classes={model_config.num_classes}"
            )
        self.cfg, self.dataset, self.log = cfg, dataset, log
        self.device = device = resolve_device(cfg.device)
        self.use_amp = cfg.amp and device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
        )
        torch.manual_seed(cfg.seed)
        model: CxrModel = build_model(model_config).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ws = model.weight_source
        self.weight_info = asdict(ws) if hasattr(ws, "__dataclass_fields__") else {"repr": repr(ws)}
        images = torch.from_numpy(np.array(dataset.images(cfg.resolution)))  # own, writable copy
        self.images = images.unsqueeze(1).to(device)  # uint8 (N, 1, R, R), kept on the device
        self.labels = torch.tensor(dataset.labels, dtype=torch.long, device=device)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.cache_info: dict = {"used": False, "hit": False, "key": None, "bytes": 0}
        self.feats: torch.Tensor | None = None
        # Frozen-feature cache: only when the frozen prefix sees un-augmented images.
        split = model.split_frozen() if (cfg.feature_cache and cfg.augment == 0) else None
        if split is not None:
            self._load_features(split[0], model_config, feature_cache)

    def autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp
        )

    def _load_features(self, prefix: nn.Module, mc: ModelConfig, cache: FeatureCache | None):
        cfg, device = self.cfg, self.device
        key = feature_key(
            backbone=mc.backbone,
            weights=self.weight_info.get("sha256") or f"{self.weight_info.get('kind')}:{cfg.seed}",
            frozen=self.model.frozen_stages,
            resolution=cfg.resolution,
            gray=mc.gray_mode,
            dataset=self.dataset.hash,
            amp=str(self.amp_dtype) if self.use_amp else "fp32",
        )
        cache = cache if cache is not None else FeatureCache()

        def compute() -> torch.Tensor:
            prefix.eval()
            chunks = []
            with torch.inference_mode(), self.autocast():
                for i in range(0, len(self.images), cfg.eval_batch_size):
                    chunks.append(
                        prefix(
                            self.prep_images(self.images[i : i + cfg.eval_batch_size], False)
                        ).float()
                    )
            return torch.cat(chunks)

        t0 = time.perf_counter()
        feats_cpu, hit = cache.get_or_compute(key, compute)
        self.feats = feats_cpu.to(device)
        self.cache_info = {
            "used": True,
            "hit": hit,
            "key": key,
            "bytes": int(feats_cpu.numel() * feats_cpu.element_size()),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if self.log:
            self.log(
                f"frozen features {'reused' if hit else 'computed'} "
                f"({self.cache_info['bytes'] >> 20} MiB)"
            )

    def prep_images(self, xb: torch.Tensor, train: bool) -> torch.Tensor:
        x = xb.float().div_(255.0)
        if train and self.cfg.augment > 0:
            x = augment_batch(x, self.cfg.augment, self.gen)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @staticmethod
    def prep_feats(xb: torch.Tensor, train: bool) -> torch.Tensor:
        return xb

    def fit(
        self,
        train_idx: np.ndarray,
        val_idx: np.ndarray | None,
        *,
        fold: int = 0,
        n_folds: int = 1,
        metric: str = "balanced_accuracy",
        report: Reporter | None = None,
    ) -> tuple[list[dict], np.ndarray | None, dict | None, float, int]:
        """Train from the initial weights on `train_idx`; evaluate on `val_idx` every epoch.

        Returns (curve, last validation probabilities, last validation metrics, training
        seconds, images trained on).
        """
        cfg, device, model = self.cfg, self.device, self.model
        classes = self.dataset.classes
        model.load_state_dict(self.init_state)
        if self.feats is not None:
            _, net = model.split_frozen()
            x_source, prep = self.feats, self.prep_feats
        else:
            net, x_source, prep = model, self.images, self.prep_images
        tr = torch.tensor(train_idx, dtype=torch.long, device=device)
        va = torch.tensor(val_idx, dtype=torch.long, device=device) if val_idx is not None else None
        counts = torch.bincount(self.labels[tr], minlength=len(classes)).float()
        weight = None
        if cfg.class_weighting:
            weight = (counts.sum() / (len(classes) * counts.clamp(min=1))).to(device)
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the configuration leaves no trainable parameter")
        opt = _optimizer(params, cfg)
        steps = max(1, math.ceil(len(tr) / cfg.batch_size))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
        curve: list[dict] = []
        best_val, bad_epochs = math.inf, 0
        probs, m = None, None
        train_time, n_trained = 0.0, 0
        for epoch in range(cfg.epochs):
            net.train()
            t0 = time.perf_counter()
            perm = tr[torch.randperm(len(tr), generator=self.gen).to(device)]
            loss_sum = torch.zeros((), device=device)
            for s in range(steps):
                idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                xb = prep(x_source[idx], True)
                with self.autocast():
                    loss = F.cross_entropy(
                        net(xb).float(),
                        self.labels[idx],
                        weight=weight,
                        label_smoothing=cfg.label_smoothing,
                    )
                if not torch.isfinite(loss):
                    raise TrialFailed(
                        f"training loss became {loss.item()} in fold {fold} epoch {epoch} "
                        f"step {s} (learning rate {cfg.lr:g} may be too high)",
                        kind="nan",
                    )
                opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(opt)
                self.scaler.update()
                sched.step()
                loss_sum += loss.detach() * len(idx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - t0
            n_trained += len(tr)
            point = {
                "epoch": epoch,
                "train_loss": float(loss_sum) / len(tr),
                "lr": float(sched.get_last_lr()[0]),
            }
            if va is not None:
                probs = _predict(net, x_source[va], prep, cfg.eval_batch_size, self.autocast)
                y_va = self.dataset.labels[val_idx]
                val_loss = float(
                    F.nll_loss(
                        torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                        torch.from_numpy(np.asarray(y_va)),
                    )
                )
                m = compute_metrics(y_va, probs, classes, positive=self.dataset.positive)
                value = float(scalar_metrics(m).get(metric, float("nan")))
                point.update(val_loss=val_loss, value=value)
            curve.append(point)
            if self.log:
                extra = (
                    f", val loss {point['val_loss']:.4f}, {metric} {point['value']:.4f}"
                    if va is not None
                    else ""
                )
                self.log(
                    f"fold {fold + 1}/{n_folds} epoch {epoch + 1}/{cfg.epochs}: "
                    f"train loss {point['train_loss']:.4f}{extra}"
                )
            if va is None:
                continue
            if report is not None:
                report(fold * cfg.epochs + epoch, point["value"])
            if cfg.early_stopping is not None:
                if point["val_loss"] < best_val - 1e-4:
                    best_val, bad_epochs = point["val_loss"], 0
                else:
                    bad_epochs += 1
                    if bad_epochs >= cfg.early_stopping:
                        break
        return curve, probs, m, train_time, n_trained

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities of the current model on (N, 1, R, R) uint8 images."""
        return _predict(
            self.model, images, self.prep_images, self.cfg.eval_batch_size, self.autocast
        )


_SPLITS: dict[tuple, list] = {}


def _dataset_splits(
    dataset: PreparedDataset, n_folds: int, holdout: float | None, seed: int
) -> list:
    """The patient-grouped folds of a dataset, computed once per (content, K, holdout, seed):
    every trial of a search evaluates on the same folds, and StratifiedGroupKFold takes ~1 s."""
    key = (dataset.hash, n_folds, holdout, seed)
    if key not in _SPLITS:
        _SPLITS[key] = make_splits(
            dataset.manifest["label"].to_numpy(),
            dataset.groups,
            n_folds=n_folds,
            holdout=holdout,
            seed=seed,
        )
    return _SPLITS[key]


def _trial_splits(dataset: PreparedDataset, cfg: TrainConfig) -> list:
    """The folds a configuration trains on: the dataset's splits, the first `max_folds`."""
    splits = _dataset_splits(dataset, cfg.n_folds, cfg.holdout, cfg.seed)
    return splits if cfg.max_folds is None else splits[: cfg.max_folds]


def fit_full(
    dataset: PreparedDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    feature_cache: FeatureCache | None = None,
    log: Callable[[str], None] | None = None,
) -> CxrModel:
    """Train one configuration on every image of `dataset` (for export); returns the model
    in eval mode on the CPU. Validation-based early stopping does not apply."""
    session = _Session(dataset, model_config, train_config, feature_cache=feature_cache, log=log)
    session.fit(np.arange(len(dataset)), None)
    return session.model.eval().to("cpu").to(memory_format=torch.contiguous_format)


def fit_folds(
    dataset: PreparedDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    feature_cache: FeatureCache | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[CxrModel], list[dict]]:
    """Train one configuration on each cross-validation fold exactly as `run_trial` does (same
    patient-grouped splits, seed and early stopping) and keep the fold models; returns the
    models (eval mode, CPU) and each one's metrics on its own validation fold."""
    cfg = train_config
    session = _Session(dataset, model_config, cfg, feature_cache=feature_cache, log=log)
    splits = _trial_splits(dataset, cfg)
    models: list[CxrModel] = []
    fold_metrics: list[dict] = []
    for fi, sp in enumerate(splits):
        if log:
            log(f"fold {fi + 1}/{len(splits)}: training on {len(sp.train)} images")
        curve, _, m, _, _ = session.fit(sp.train, sp.val, fold=fi, n_folds=len(splits))
        m["epochs_run"] = len(curve)
        m["n_train"], m["n_val"] = len(sp.train), len(sp.val)
        fold_metrics.append(m)
        member = copy.deepcopy(session.model).eval().to("cpu")
        models.append(member.to(memory_format=torch.contiguous_format))
    return models, fold_metrics


def run_trial(
    dataset: PreparedDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    metric: str = "balanced_accuracy",
    report: Reporter | None = None,
    feature_cache: FeatureCache | None = None,
    external: PreparedDataset | None = None,
    log: Callable[[str], None] | None = None,
) -> TrialResult:
    """Train and evaluate one configuration with patient-grouped cross-validation.

    Metrics are computed per validation fold and summarised as mean, std and a t-based 95 %
    CI over folds. `external`, if given, is evaluated once at the end with the ensemble of the
    fold models (average of their probabilities) and is never used for any choice.
    """
    cfg = train_config
    classes = dataset.classes
    if external is not None and external.classes != classes:
        raise DataError(
            f"external set {external.name!r} has classes {external.classes}, the study has "
            f"{classes}; map its labels first (e.g. --label-map normal=non_covid)"
        )
    session = _Session(dataset, model_config, cfg, feature_cache=feature_cache, log=log)
    model, device = session.model, session.device
    total_params, trainable_params = model.param_counts()
    y_all = dataset.labels
    splits = _trial_splits(dataset, cfg)
    fold_metrics: list[dict] = []
    curves: list[list[dict]] = []
    oof = np.full((len(dataset), len(classes)), np.nan, dtype=np.float64)
    ext_probs: list[np.ndarray] = []
    ext_images = None
    if external is not None:
        ext_images = torch.from_numpy(np.array(external.images(cfg.resolution)))
        ext_images = ext_images.unsqueeze(1).to(device)
    train_time = 0.0
    n_trained = 0
    for fi, sp in enumerate(splits):
        curve, probs, m, seconds, n = session.fit(
            sp.train, sp.val, fold=fi, n_folds=len(splits), metric=metric, report=report
        )
        train_time += seconds
        n_trained += n
        oof[sp.val] = probs
        m["epochs_run"] = len(curve)
        fold_metrics.append(m)
        curves.append(curve)
        if ext_images is not None:
            ext_probs.append(session.predict(ext_images))  # this fold's model

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
    ext = None
    if external is not None and ext_probs:
        p = np.mean(ext_probs, axis=0)
        ext = {
            "dataset": external.name,
            "dataset_hash": external.hash,
            "metrics": compute_metrics(external.labels, p, classes, positive=external.positive),
            "bootstrap": bootstrap_metrics(external.labels, p, classes, positive=external.positive),
        }
    latency = _latency_ms(model, cfg.resolution, device, session.autocast)
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
        feature_cache=session.cache_info,
        weight_source=session.weight_info,
        external=ext,
        splits=[{"fold": s.fold, "n_train": len(s.train), "n_val": len(s.val)} for s in splits],
        oof_probs=oof,
    )
    if metric not in result.summary["metrics"]:
        raise ConfigError(
            f"metric {metric!r} is not computed for this dataset; "
            f"allowed: {sorted(result.summary['metrics'])}"
        )
    return result
