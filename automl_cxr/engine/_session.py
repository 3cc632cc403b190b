"""One training session: a model built for a dataset, trained on a fold (frozen-feature cache,
site-adversarial and source-balanced training, early stopping) and used to predict."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from automl_cxr import __version__
from automl_cxr.data import PreparedDataset, mapped_copy_on_write, site_groups
from automl_cxr.engine._adversarial import SiteTraining
from automl_cxr.engine._augment import augment_batch
from automl_cxr.engine._config import TrainConfig
from automl_cxr.engine._device import amp_plan, resolve_device
from automl_cxr.engine._features import FeatureCache, frozen_inputs, state_hash
from automl_cxr.engine._folds import dataset_sites, inner_split
from automl_cxr.engine._groups import TrainingLoss
from automl_cxr.engine._metrics import (
    compute_metrics,
    fold_metric,
    scalar_metrics,
)
from automl_cxr.engine._optim import (
    WeightAverage,
    build_optimizer,
    build_scheduler,
    state_copy,
)
from automl_cxr.errors import ConfigError, TrialFailed
from automl_cxr.lungs import preprocess_for, preprocessed_images
from automl_cxr.models import CxrModel, ModelConfig, build_model

__all__ = ["Fit", "Reporter", "Session"]

Reporter = Callable[[int, float], None]
"""`report(step, value)`: called after every epoch (step = fold * epochs + epoch) with the
validation value of the trial's metric; it may raise (e.g. optuna.TrialPruned) to stop."""


def _predict(
    net: nn.Module, x: torch.Tensor, prep, batch: int, autocast, rows: torch.Tensor | None = None
) -> np.ndarray:
    """Probabilities of `net` on `x` (or on its `rows`, gathered one batch at a time: a fold's
    rows gathered at once were a copy of a fifth of the features every epoch)."""
    net.eval()
    out = []
    n = len(x) if rows is None else len(rows)
    with torch.inference_mode(), autocast():
        for i in range(0, n, batch):
            xb = x[i : i + batch] if rows is None else x[rows[i : i + batch]]
            out.append(torch.softmax(net(prep(xb, False)).float(), dim=1))
    return torch.cat(out).cpu().numpy()


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each training batch; a last batch of one image is merged into the
    one before it (BatchNorm cannot train on a single sample)."""
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class Session:
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
        self.eval_batch = cfg.eval_batch(device.type)
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
        # the image cache mapped copy-on-write, not copied: the workers share one copy of it
        images = torch.from_numpy(mapped_copy_on_write(self.dataset_images(dataset)))
        self.images: torch.Tensor | None = images.unsqueeze(1).to(device)  # uint8 (N, 1, R, R)
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
                batch_size=self.eval_batch,
                autocast=self.feature_autocast,
                share_from=share_from,
            )
            if inputs is not None:
                self.net, self.x_source, self.prep = inputs.net, inputs.x, self.prep_feats
                self.cache_info = inputs.info
                self.images = None  # trains on the features: the pixels' mapping is let go
                if log:
                    what = "pooled features" if inputs.info["kind"] == "pooled" else "features"
                    how = "reused" if inputs.info["hit"] else "computed"
                    log(f"frozen {what} {how} ({inputs.info['bytes'] >> 20} MiB)")
        # What each fold restores before training: the weights `net` trains (the frozen
        # prefix behind cached features never changes), ~8 ms less per fold than the model.
        self.init_state = state_copy(self.net)

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
        inner: bool = False,
    ) -> Fit:
        """Train from the initial weights on `train_idx`; evaluate on `val_idx` every epoch.

        With `cfg.early_stopping` and a validation fold, the training patients are split again
        (`inner_split`): the model trains on the inner training part, stops once the inner
        validation loss has not improved for `early_stopping` epochs, and is restored to the
        epoch with the best inner loss; the returned probabilities and metrics on `val_idx` are
        those of that epoch; with `inner` the same happens without a validation fold (a model
        for export, stopped as the folds were). Without early stopping, it trains for `epochs`
        (default `cfg.epochs`) and returns the last epoch's. `report` gets the outer fold value
        of every epoch.
        """
        cfg, device = self.cfg, self.device
        classes = self.dataset.classes
        n_epochs = cfg.epochs if epochs is None else epochs
        net, x_source, prep = self.net, self.x_source, self.prep
        net.load_state_dict(self.init_state)
        inner_val: np.ndarray | None = None
        fit_idx = np.asarray(train_idx)
        if cfg.early_stopping is not None and (val_idx is not None or inner):
            which = None if val_idx is None else fold  # None: a model for export
            fit_idx, inner_val = inner_split(self.dataset, fit_idx, cfg, which)
        tr = torch.tensor(fit_idx, dtype=torch.long, device=device)
        counts = torch.bincount(self.labels[tr], minlength=len(classes)).float()
        weight = None
        if cfg.class_weighting:
            weight = (counts.sum() / (len(classes) * counts.clamp(min=1))).to(device)
        if not any(p.requires_grad for p in net.parameters()):
            raise ConfigError("the configuration leaves no trainable parameter")
        opt = build_optimizer(net, cfg)
        avg = WeightAverage(net, cfg.weight_average) if cfg.weight_average > 0 else None
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
        objective = TrainingLoss(self.dataset, fit_idx, cfg, weight, device)
        batches = _batches(len(tr), cfg.batch_size)
        sched = build_scheduler(opt, cfg, len(batches))
        updates = 0
        seen = torch.zeros(len(self.labels), dtype=torch.bool, device=device)
        out = Fit(train_idx=fit_idx, inner_val_idx=inner_val)
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
                    loss = objective(logits, yb, idx)
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
                if avg is not None:
                    avg.update(net)
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
            with avg.swapped(net) if avg is not None else contextlib.nullcontext():
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
                best_state = avg.state() if avg is not None else state_copy(net)
            else:
                bad_epochs += 1
            if report is not None and val_idx is not None:
                report(fold * cfg.epochs + epoch, point["value"])
            if inner_val is not None and bad_epochs >= cfg.early_stopping:
                break
        if site is not None:
            site.close()
            out.site_adversary = {"sites": site.n_sites, "active": site.active}
        if objective.dro is not None:
            out.group_weights = objective.dro.record()
        if best_state is not None:
            net.load_state_dict(best_state)  # the model of the chosen epoch
        else:
            if avg is not None:  # the last epoch, as it was evaluated
                net.load_state_dict(avg.avg)
            if out.best_epoch < 0:  # the inner loss never was a number: keep the last epoch
                out.probs, out.metrics, out.best_epoch = probs, m, len(out.curve) - 1
        out.trained = np.flatnonzero(seen.cpu().numpy())
        out.wall = time.perf_counter() - fit_start
        return out

    def _evaluate(
        self, net: nn.Module, x_source: torch.Tensor, prep, idx: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """(probabilities, mean cross-entropy) of `net` on rows `idx`."""
        ti = torch.tensor(idx, dtype=torch.long, device=self.device)
        probs = _predict(net, x_source, prep, self.eval_batch, self.autocast, ti)
        loss = F.nll_loss(
            torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
            torch.from_numpy(np.asarray(self.dataset.labels[idx])),
        )
        return probs, float(loss)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities of the current model on (N, 1, R, R) uint8 images."""
        return _predict(self.model, images, self.prep_images, self.eval_batch, self.autocast)


def _plan_digest(model: CxrModel, depth: int) -> str:
    """What freezing `depth` stages of this architecture cuts (frozen tensors, modules, split)."""
    from automl_cxr.models import freeze_plan

    plan = freeze_plan(model._info, depth)
    text = json.dumps([sorted(plan.tensors), list(plan.modules), plan.split])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Fit:
    """What one `Session.fit` returns: the curve, the chosen epoch's outer-fold probabilities
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
    group_weights: dict | None = None  # group DRO's final weight of each (source, class)

    @property
    def epochs_run(self) -> int:
        return len(self.curve)
