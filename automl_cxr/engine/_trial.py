"""One configuration, one dataset: patient-grouped CV, training, metrics — `run_trial`."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from automl_cxr import __version__
from automl_cxr._compat.torch import cpu_bf16_supported
from automl_cxr.data import PreparedDataset, site_groups
from automl_cxr.engine._adversarial import SiteTraining
from automl_cxr.engine._augment import augment_batch
from automl_cxr.engine._config import TrainConfig
from automl_cxr.engine._features import FeatureCache, frozen_inputs, state_hash
from automl_cxr.engine._metrics import (
    bootstrap_metrics,
    compute_metrics,
    fold_metric,
    roc_curves,
    scalar_metrics,
    summarize_folds,
)
from automl_cxr.engine._splits import make_site_splits, make_splits, members_hash
from automl_cxr.errors import ConfigError, DataError, TrialFailed
from automl_cxr.lungs import preprocess_for, preprocessed_images
from automl_cxr.models import CxrModel, ModelConfig, build_model

__all__ = [
    "cpu_bf16_supported",
    "dataset_splits",
    "Reporter",
    "TrialResult",
    "dataset_sites",
    "fit_folds",
    "fit_full",
    "resolve_device",
    "row_identities",
    "run_precision",
    "run_trial",
]

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


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available here")
    return dev


def amp_plan(device: torch.device, amp: bool, cpu_amp: bool) -> tuple[bool, torch.dtype]:
    """(autocast on, its dtype) for a run on `device`: AMP on CUDA (bf16 where the GPU has it,
    else fp16); on CPU bfloat16 only when asked for and native."""
    if device.type == "cuda":
        return amp, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return bool(amp and cpu_amp and device.type == "cpu" and cpu_bf16_supported()), torch.bfloat16


def run_precision(device: str, *, cpu_amp: bool, amp: bool = True) -> str:
    """What a run's trials compute in, for its protocol: "fp32", "bf16", "fp16", or "amp" for
    GPUs this process cannot see (a Ray cluster's: bf16 or fp16 by GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "amp" if amp else "fp32"
    on, dtype = amp_plan(resolve_device(device), amp, cpu_amp)
    return ("bf16" if dtype == torch.bfloat16 else "fp16") if on else "fp32"


def _predict(net: nn.Module, x: torch.Tensor, prep, batch: int, autocast) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode(), autocast():
        for i in range(0, len(x), batch):
            out.append(torch.softmax(net(prep(x[i : i + batch], False)).float(), dim=1))
    return torch.cat(out).cpu().numpy()


def _optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on biases, norm layers and 1-d parameters
    (`filter_bias_and_bn`); frozen parameters are left out. "sgd" is Nesterov SGD."""
    return create_optimizer_v2(
        net,
        opt=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=True,
    )


_TIMM_SCHEDULE = {"cosine": "cosine", "step": "multistep", "none": "constant"}


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """timm's scheduler factory, stepped per update: linear warmup for `warmup_epochs`, then
    cosine to 0, steps of x0.1 at 50 % and 75 % of the epochs, or constant."""
    warm = min(cfg.warmup_epochs, cfg.epochs)
    decay = max(cfg.epochs - warm, 1)
    sched, _ = create_scheduler_v2(
        opt,
        sched=_TIMM_SCHEDULE[cfg.schedule],
        num_epochs=decay,
        decay_milestones=[0.5 * cfg.epochs - warm, 0.75 * cfg.epochs - warm],
        decay_rate=0.1,
        min_lr=0.0,
        warmup_epochs=warm,
        warmup_lr=cfg.lr / max(1, warm * steps_per_epoch),
        warmup_prefix=True,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return sched


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each training batch; a last batch of one image is merged into the
    one before it (BatchNorm cannot train on a single sample)."""
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


_LATENCY: dict[str, float] = {}
_PROBE: dict[str, torch.Tensor] = {}  # per backbone key: one image's feature map

_NO_LATENCY_EFFECT = frozenset({"dropout"})
"""Head options that change training but not the cost of a forward pass."""


def _latency_once(
    model: CxrModel,
    mc: ModelConfig,
    resolution: int,
    device: torch.device,
    autocast,
    precision: str,
) -> float:
    """Single-image inference latency (ms) of `model`: its backbone's `forward_features`
    plus its head, each timed once per process for its architecture, resolution, device,
    precision and thread count and summed. Frozen depth, weights and dropout do not change
    it, so a search times each backbone once and each head shape once (on the backbone's
    feature map, well under a millisecond) instead of seven full forward passes per trial."""
    common = [resolution, str(device), precision, torch.get_num_threads()]
    head_kwargs = {k: v for k, v in mc.head_kwargs.items() if k not in _NO_LATENCY_EFFECT}
    keys = [
        json.dumps(parts, sort_keys=True, default=str)
        for parts in (
            [mc.backbone, mc.gray_mode, *common],
            [mc.backbone, mc.head, head_kwargs, *common],
        )
    ]
    if any(k not in _LATENCY for k in keys):
        model.eval()
        if keys[0] not in _LATENCY or keys[0] not in _PROBE:
            x = torch.rand(1, 1, resolution, resolution, device=device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast():
                _PROBE[keys[0]] = model.forward_features(x)  # a feature map for head timing
            _LATENCY[keys[0]] = _latency_ms(model.forward_features, x, device, autocast)
        if keys[1] not in _LATENCY:
            head = lambda f: model.head(model.neck(f))  # noqa: E731
            _LATENCY[keys[1]] = _latency_ms(head, _PROBE[keys[0]], device, autocast)
    return _LATENCY[keys[0]] + _LATENCY[keys[1]]


def _latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device, autocast):
    """Median wall time (ms) of `fn(x)` over 5 calls after 2 warm-up calls."""
    times = []
    with torch.inference_mode(), autocast():
        for i in range(7):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn(x)
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
        share_from: int | None = None,
    ) -> None:
        classes = dataset.classes
        if model_config.num_classes != len(classes):
            raise ConfigError(
                f"num_classes must equal the dataset's {len(classes)} classes {classes}, "
                f"but got num_classes={model_config.num_classes}"
            )
        self.cfg, self.dataset, self.log = cfg, dataset, log
        self.deadline: tuple[float, float] | None = None  # (time.monotonic() limit, seconds)
        self.device = device = resolve_device(cfg.device)
        self.use_amp, self.amp_dtype = amp_plan(device, cfg.amp, cfg.cpu_amp)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
        )
        torch.manual_seed(cfg.seed)
        model: CxrModel = build_model(model_config).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        ws = model.weight_source
        self.weight_info = asdict(ws) if hasattr(ws, "__dataclass_fields__") else {"repr": repr(ws)}
        self.pp_spec, self.pp_module = preprocess_for(cfg, Path(dataset.root).parent)
        self.pp_info: dict = {"key": self.pp_spec.key(), "roi": cfg.roi, "intensity": cfg.intensity}
        images = torch.from_numpy(np.array(self.dataset_images(dataset)))  # own, writable copy
        self.images = images.unsqueeze(1).to(device)  # uint8 (N, 1, R, R), kept on the device
        self.labels = torch.tensor(dataset.labels, dtype=torch.long, device=device)
        # the adversary's site of each row: sites sharing a patient merged, as site CV does
        # (the source, for a manifest without sites)
        self.sites: np.ndarray | None = None
        if cfg.site_adversarial > 0:
            self.sites = (
                site_groups(dataset.groups, dataset_sites(dataset)[0])
                if "site" in dataset.manifest.columns
                else dataset.manifest["source"].to_numpy().astype(str)
            )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.cache_info: dict = {"used": False, "hit": False, "key": None, "bytes": 0}
        # What fit() trains: the whole model on images, or (frozen-feature cache, only when
        # the frozen prefix sees un-augmented images) the trainable rest on cached features.
        self.net: nn.Module = model
        self.x_source, self.prep = self.images, self.prep_images
        if cfg.feature_cache and cfg.augment == 0 and model.frozen_stages > 0:
            inputs = frozen_inputs(
                model,
                self.images,
                lambda xb: self.prep_images(xb, False),
                lambda depth, prefix: self.feature_key_parts(depth, prefix, model_config),
                feature_cache if feature_cache is not None else FeatureCache(),
                batch_size=cfg.eval_batch_size,
                autocast=self.feature_autocast,
                share_from=share_from,
            )
            if inputs is not None:
                self.net, self.x_source, self.prep = inputs.net, inputs.x, self.prep_feats
                self.cache_info = inputs.info
                if log:
                    what = "pooled features" if inputs.info["kind"] == "pooled" else "features"
                    how = "reused" if inputs.info["hit"] else "computed"
                    log(f"frozen {what} {how} ({inputs.info['bytes'] >> 20} MiB)")
        # What each fold restores before training: the weights `net` trains (the frozen
        # prefix behind cached features never changes), ~8 ms less per fold than the model.
        self.init_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def dataset_images(self, dataset: PreparedDataset) -> np.ndarray:
        """(N, R, R) uint8 images of `dataset` (the training set or an external one) through
        the configuration's `roi`/`intensity` preprocessing (cached once per image); images
        whose lungs were not found fell back to `full` and are counted in `pp_info`."""
        if self.pp_module is None:
            return dataset.images(self.cfg.resolution)
        pre = preprocessed_images(dataset, self.pp_spec, self.pp_module)
        counts = self.pp_info.setdefault("fallbacks", {})
        counts[dataset.name] = {"images": len(dataset), "full": pre.fallbacks}
        return pre.images

    @property
    def precision(self) -> str:
        """What convolutions and matrix products ran in: "fp32", "bf16" or "fp16"."""
        if not self.use_amp:
            return "fp32"
        return "bf16" if self.amp_dtype == torch.bfloat16 else "fp16"

    def autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp
        )

    @property
    def feature_amp(self) -> bool:
        """Whether cached frozen features are computed under autocast: on CUDA with `amp`; on a
        CPU never. There they are computed once per backbone and shared by fp32 and bf16
        trials, and bf16 error compounded through the frozen stages can cost accuracy: on
        four_class, five MobileNet v2 7-of-8 MLP trials lost 0.004 balanced accuracy on average
        with bf16 features, none with bf16 in the trained part alone (benchmarks/RESULTS.md)."""
        return self.use_amp and self.device.type == "cuda"

    def feature_autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=self.amp_dtype, enabled=self.feature_amp
        )

    def feature_key_parts(self, depth: int, prefix: nn.Module, mc: ModelConfig) -> dict:
        """Everything that changes the output of the first `depth` frozen stages (`prefix`)
        on this dataset's images."""
        import timm

        from automl_cxr.data import CACHE_VERSION

        norm = self.model.input_norm
        sha = self.weight_info.get("sha256")
        return {
            "backbone": mc.backbone,
            "frozen": int(depth),
            "weights": f"sha256:{sha}" if sha else f"state:{state_hash(prefix)}",
            "gray": mc.gray_mode,
            "mean": [round(float(v), 8) for v in norm.mean.flatten()],
            "std": [round(float(v), 8) for v in norm.std.flatten()],
            "resolution": self.cfg.resolution,
            "dtype": str(self.amp_dtype) if self.feature_amp else "fp32",
            "device": self.device.type,
            "image_cache": CACHE_VERSION,
            "timm": timm.__version__,
            "torch": torch.__version__,
            "dataset": self.dataset.hash,
            "preprocess": self.pp_spec.key(),
            "plan": _plan_digest(self.model, depth),
            "automl_cxr": __version__,
        }

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
        epochs: int | None = None,
    ) -> _Fit:
        """Train from the initial weights on `train_idx`; evaluate on `val_idx` every epoch.

        With `cfg.early_stopping` and a validation fold, the training patients are split again
        (`_inner_split`): the model trains on the inner training part, stops once the inner
        validation loss has not improved for `early_stopping` epochs, and is restored to the
        epoch with the best inner loss; the returned probabilities and metrics on `val_idx` are
        those of that epoch. Without early stopping, it trains for `epochs` (default
        `cfg.epochs`) and returns the last epoch's. `report` gets the outer fold value of
        every epoch.
        """
        cfg, device = self.cfg, self.device
        classes = self.dataset.classes
        n_epochs = cfg.epochs if epochs is None else epochs
        net, x_source, prep = self.net, self.x_source, self.prep
        net.load_state_dict(self.init_state)
        inner_val: np.ndarray | None = None
        fit_idx = np.asarray(train_idx)
        if cfg.early_stopping is not None and val_idx is not None:
            fit_idx, inner_val = _inner_split(self.dataset, fit_idx, cfg, fold)
        tr = torch.tensor(fit_idx, dtype=torch.long, device=device)
        counts = torch.bincount(self.labels[tr], minlength=len(classes)).float()
        weight = None
        if cfg.class_weighting:
            weight = (counts.sum() / (len(classes) * counts.clamp(min=1))).to(device)
        if not any(p.requires_grad for p in net.parameters()):
            raise ConfigError("the configuration leaves no trainable parameter")
        opt = _optimizer(net, cfg)
        site = None
        if cfg.site_adversarial > 0:
            site = SiteTraining(
                net,
                self.sites,
                fit_idx,
                len(classes),
                cfg.site_adversarial,
                cfg.lr,
                cfg.seed + 7919 * (fold + 1),
                device,
            )
        balance = self._source_balance(fit_idx) if cfg.source_balance else None
        batches = _batches(len(tr), cfg.batch_size)
        sched = _scheduler(opt, cfg, len(batches))
        updates = 0
        seen = torch.zeros(len(self.labels), dtype=torch.bool, device=device)
        out = _Fit(train_idx=fit_idx, inner_val_idx=inner_val)
        fit_start = time.perf_counter()
        best_loss, best_state, bad_epochs = math.inf, None, 0
        for epoch in range(n_epochs):
            net.train()
            t0 = time.perf_counter()
            perm = tr[torch.randperm(len(tr), generator=self.gen).to(device)]
            loss_sum = torch.zeros((), device=device)
            for s, (start, stop) in enumerate(batches):
                idx = perm[start:stop]
                seen[idx] = True
                xb = prep(x_source[idx], True)
                with self.autocast():
                    logits, yb = net(xb).float(), self.labels[idx]
                    if balance is None:
                        loss = F.cross_entropy(
                            logits, yb, weight=weight, label_smoothing=cfg.label_smoothing
                        )
                    else:  # the weighted mean, each image also weighted by its source
                        per = F.cross_entropy(
                            logits,
                            yb,
                            weight=weight,
                            label_smoothing=cfg.label_smoothing,
                            reduction="none",
                        )
                        cw = 1.0 if weight is None else weight[yb]
                        g = balance[idx]
                        loss = (g * per).sum() / (g * cw).sum()
                    if site is not None:
                        adv = site.loss(idx, yb)
                        if adv is not None:
                            loss = loss + adv
                if self.deadline is not None and time.monotonic() > self.deadline[0]:
                    raise TrialFailed(
                        f"stopped in fold {fold} epoch {epoch}: the trial ran longer than its "
                        f"time limit of {self.deadline[1]:g} s (--trial-timeout)",
                        kind="timeout",
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
                if site is not None:
                    site.step()
                updates += 1
                sched.step_update(num_updates=updates)
                loss_sum += loss.detach() * len(idx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds = time.perf_counter() - t0
            out.seconds += epoch_seconds
            out.n_trained += len(tr)
            point = {
                "epoch": epoch,
                "train_loss": float(loss_sum) / len(tr),
                "lr": float(opt.param_groups[0]["lr"]),
                "train_seconds": round(epoch_seconds, 4),
                "n_train": int(len(tr)),
            }
            probs = m = None
            if val_idx is not None:
                probs, val_loss = self._evaluate(net, x_source, prep, val_idx)
                m = compute_metrics(
                    self.dataset.labels[val_idx], probs, classes, positive=self.dataset.positive
                )
                value = float(scalar_metrics(m).get(fold_metric(metric), float("nan")))
                point.update(val_loss=val_loss, value=value)
            if inner_val is not None:
                point["inner_val_loss"] = self._evaluate(net, x_source, prep, inner_val)[1]
            out.curve.append(point)
            if self.log:
                extra = (
                    f", val loss {point['val_loss']:.4f}, {metric} {point['value']:.4f}"
                    if val_idx is not None
                    else ""
                )
                if inner_val is not None:
                    extra += f", inner val loss {point['inner_val_loss']:.4f}"
                self.log(
                    f"fold {fold + 1}/{n_folds} epoch {epoch + 1}/{n_epochs}: "
                    f"train loss {point['train_loss']:.4f}{extra}"
                )
            if inner_val is None:  # no early stopping: the last epoch is the fold's result
                out.probs, out.metrics, out.best_epoch = probs, m, epoch
            elif point["inner_val_loss"] < best_loss - 1e-4:
                best_loss, bad_epochs = point["inner_val_loss"], 0
                out.probs, out.metrics, out.best_epoch = probs, m, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad_epochs += 1
            if report is not None and val_idx is not None:
                report(fold * cfg.epochs + epoch, point["value"])
            if inner_val is not None and bad_epochs >= cfg.early_stopping:
                break
        if site is not None:
            site.close()
            out.site_adversary = {"sites": site.n_sites, "active": site.active}
        if best_state is not None:
            net.load_state_dict(best_state)  # the model of the chosen epoch
        elif out.best_epoch < 0:  # the inner loss never was a number: keep the last epoch
            out.probs, out.metrics, out.best_epoch = probs, m, len(out.curve) - 1
        out.trained = np.flatnonzero(seen.cpu().numpy())
        out.wall = time.perf_counter() - fit_start
        return out

    def _source_balance(self, fit_idx: np.ndarray) -> torch.Tensor:
        """Per-row weights (0 outside `fit_idx`): within each class of the training rows, every
        source gets the same total weight and the class keeps its image count."""
        labels = self.dataset.labels[fit_idx]
        sources = self.dataset.manifest["source"].to_numpy().astype(str)[fit_idx]
        w = np.zeros(len(self.dataset), dtype=np.float32)
        for c in np.unique(labels):
            in_c = labels == c
            names, counts = np.unique(sources[in_c], return_counts=True)
            share = in_c.sum() / len(names)
            for name, n in zip(names, counts, strict=True):
                w[fit_idx[in_c & (sources == name)]] = share / n
        return torch.from_numpy(w).to(self.device)

    def _evaluate(
        self, net: nn.Module, x_source: torch.Tensor, prep, idx: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """(probabilities, mean cross-entropy) of `net` on rows `idx`."""
        ti = torch.tensor(idx, dtype=torch.long, device=self.device)
        probs = _predict(net, x_source[ti], prep, self.cfg.eval_batch_size, self.autocast)
        loss = F.nll_loss(
            torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
            torch.from_numpy(np.asarray(self.dataset.labels[idx])),
        )
        return probs, float(loss)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities of the current model on (N, 1, R, R) uint8 images."""
        return _predict(
            self.model, images, self.prep_images, self.cfg.eval_batch_size, self.autocast
        )


def _plan_digest(model: CxrModel, depth: int) -> str:
    """What freezing `depth` stages of this architecture cuts (frozen tensors, modules, split)."""
    from automl_cxr.models._freeze import freeze_plan

    plan = freeze_plan(model._info, depth)
    text = json.dumps([sorted(plan.tensors), list(plan.modules), plan.split])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _Fit:
    """What one `_Session.fit` returns: the curve, the chosen epoch's outer-fold probabilities
    and metrics, the rows it trained on, time and images seen."""

    train_idx: np.ndarray
    inner_val_idx: np.ndarray | None
    curve: list[dict] = field(default_factory=list)
    probs: np.ndarray | None = None
    metrics: dict | None = None
    best_epoch: int = -1
    seconds: float = 0.0  # in training steps
    wall: float = 0.0  # the whole fit, per-epoch evaluation included
    n_trained: int = 0
    trained: np.ndarray | None = None  # rows that were in at least one training batch
    site_adversary: dict | None = None  # sites the adversary told apart, whether it ran

    @property
    def epochs_run(self) -> int:
        return len(self.curve)


def _inner_split(
    dataset: PreparedDataset, train_idx: np.ndarray, cfg: TrainConfig, fold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Early-stopping split of a fold's training rows: patient-grouped, stratified, about
    `cfg.inner_holdout` of each class's training images. Returns absolute (fit, inner_val)."""
    labels = dataset.manifest["label"].to_numpy()[train_idx]
    try:
        (sp,) = make_splits(
            labels, dataset.groups[train_idx], holdout=cfg.inner_holdout, seed=cfg.seed + fold
        )
    except ConfigError as exc:
        raise ConfigError(
            f"early stopping needs an inner validation split of fold {fold}'s training "
            f"patients, but {exc}; use early_stopping=None or more data"
        ) from None
    return train_idx[sp.train], train_idx[sp.val]


_SPLITS: dict[tuple, tuple[list, list[str]]] = {}


def dataset_sites(dataset: PreparedDataset) -> tuple[np.ndarray, list[str]]:
    """The manifest's `site` of each image (missing ones as `<source>:unknown`, one site per
    source, with a warning) for site-held-out folds."""
    m = dataset.manifest
    if "site" not in m.columns:
        raise ConfigError(
            f"cv='site' needs a 'site' column in dataset {dataset.name!r}'s manifest, but it has "
            f"{sorted(m.columns)}; prepare it again with a version that records sites, or use "
            "cv='patient'"
        )
    site = m["site"].astype("string").fillna("").str.strip()
    missing = (site == "").to_numpy()
    warnings: list[str] = []
    if missing.any():
        fill = m["source"].astype(str).to_numpy()[missing]
        site = site.to_numpy(dtype=object)
        site[missing] = [f"{src}:unknown" for src in fill]
        warnings.append(
            f"{int(missing.sum())} images have no site; each source's are treated as one site "
            "(<source>:unknown)"
        )
    return np.asarray(site, dtype=object).astype(str), warnings


def dataset_splits(
    dataset: PreparedDataset, cv: str, n_folds: int, holdout: float | None, seed: int
) -> tuple[list, list[str]]:
    """The grouped folds of a dataset and any warnings, computed once per (content, cv, K,
    holdout, seed): every trial of a search evaluates on the same folds, and
    StratifiedGroupKFold takes ~1 s."""
    sites, warnings = dataset_sites(dataset) if cv == "site" else (None, [])
    # the content hash does not cover the site column (row by row): the folds' key does
    site_key = None if sites is None else hashlib.sha256("\n".join(sites).encode()).hexdigest()
    key = (dataset.hash, cv, site_key, n_folds, holdout, seed)
    if key not in _SPLITS:
        labels = dataset.manifest["label"].to_numpy()
        if sites is not None:
            splits, more = make_site_splits(
                labels, dataset.groups, sites, n_folds=n_folds, holdout=holdout, seed=seed
            )
            _SPLITS[key] = (splits, warnings + more)
        else:
            splits = make_splits(
                labels, dataset.groups, n_folds=n_folds, holdout=holdout, seed=seed
            )
            _SPLITS[key] = (splits, [])
    return _SPLITS[key]


def _trial_splits(dataset: PreparedDataset, cfg: TrainConfig) -> tuple[list, list[str]]:
    """The folds a configuration trains on: the dataset's splits, the first `max_folds`."""
    splits, warnings = dataset_splits(dataset, cfg.cv, cfg.n_folds, cfg.holdout, cfg.seed)
    return (splits if cfg.max_folds is None else splits[: cfg.max_folds]), list(warnings)


def row_identities(dataset: PreparedDataset) -> np.ndarray:
    """A process-independent identity per row: the image's sha256 (its path when the
    manifest has none), with `#k` appended to the k-th repeat of an identity."""
    m = dataset.manifest
    ids = (m["sha256"] if "sha256" in m.columns else m["path"]).astype(str)
    k = ids.groupby(ids).cumcount().to_numpy()
    base = ids.to_numpy(dtype=object)
    return np.array([b if j == 0 else f"{b}#{j}" for b, j in zip(base, k, strict=True)])


def _fold_record(
    dataset: PreparedDataset, ids: np.ndarray, sp, fit: _Fit, cfg: TrainConfig, sites
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
    if sites is not None:
        rec["val_sites"] = sorted(set(sites[sp.val].tolist()))
    return rec


def _full_fit_epochs(cfg: TrainConfig, fits: list[_Fit]) -> int:
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
    feature_cache: FeatureCache | None = None,
    log: Callable[[str], None] | None = None,
) -> CxrModel:
    """Train one configuration on every image of `dataset` (for export); returns the model
    in eval mode on the CPU.

    It trains for the number of epochs cross-validation scored: `epochs` if given (e.g. a
    trial's `TrialResult.full_fit_epochs`), else `cfg.epochs` without early stopping, else
    (early stopping) the folds are trained as in `run_trial` first and the median of their
    chosen epoch counts is used. The learning-rate schedule spans `cfg.epochs` and is cut
    there, as it was in the folds that stopped early. The model's `training_info` says which:
    `{"epochs", "epochs_from": "argument" | "config" | "cv_early_stopping", "fold_epochs",
    "n_trained_images", "trained_hash"}`.
    """
    cfg = train_config
    session = _Session(dataset, model_config, cfg, feature_cache=feature_cache, log=log)
    fold_epochs: list[int] | None = None
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer of at least 1, but got epochs={epochs!r}")
        n, source = epochs, "argument"
    elif cfg.early_stopping is None:
        n, source = cfg.epochs, "config"
    else:
        splits, _ = _trial_splits(dataset, cfg)
        fits = [
            session.fit(sp.train, sp.val, fold=fi, n_folds=len(splits))
            for fi, sp in enumerate(splits)
        ]
        fold_epochs = [f.best_epoch + 1 for f in fits]
        n, source = _full_fit_epochs(cfg, fits), "cv_early_stopping"
    if log:
        log(f"training on all {len(dataset)} images for {n} epochs ({source})")
    fit = session.fit(np.arange(len(dataset)), None, epochs=n)
    model = session.model.eval().to("cpu").to(memory_format=torch.contiguous_format)
    model.training_info = {
        "epochs": int(n),
        "epochs_from": source,
        "fold_epochs": fold_epochs,
        "n_trained_images": int(len(fit.trained)),
        "trained_hash": members_hash(row_identities(dataset), fit.trained),
    }
    return model


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
    session = _Session(dataset, model_config, cfg, feature_cache=feature_cache, log=log)
    splits, _ = _trial_splits(dataset, cfg)
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
    splits, warnings = _trial_splits(dataset, cfg)
    sites = dataset_sites(dataset)[0] if cfg.cv == "site" else None
    session = _Session(
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
    fits: list[_Fit] = []
    oof = np.full((len(dataset), len(classes)), np.nan, dtype=np.float64)
    oof_folds = np.full(len(dataset), -1, dtype=np.int8)
    predicted = ext_sets + ([test] if test is not None else [])  # by every fold's model
    ext_images = [
        torch.from_numpy(np.array(session.dataset_images(e))).unsqueeze(1).to(device)
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
    latency = _latency_once(
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
