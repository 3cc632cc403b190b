"""Training configuration of one trial, validated up front."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from automl_cxr.errors import ConfigError
from automl_cxr.lungs._modes import INTENSITY_MODES, ROI_MODES

__all__ = ["CPU_EVAL_BATCH", "CV_FOLDS", "CV_MODES", "OPTIMIZERS", "SCHEDULES", "TrainConfig"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "none")
CV_MODES = ("patient", "site")
CV_FOLDS = {"patient": "patient-grouped", "site": "site-held-out"}
"""What each cv mode's folds are called wherever a figure says what it is a mean over."""
CPU_EVAL_BATCH = 16
"""Inference batch on a CPU: one thread ran 16 images a batch faster than 32-128 (cache-sized
activations) and with a fraction of the memory (benchmarks/RESULTS.md)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_int(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    """`value` is an integer >= `low` (or None when `optional`); ConfigError otherwise."""
    if optional and value is None:
        return
    kind = "an integer" + (" or None" if optional else "")
    if not _is_int(value):
        raise ConfigError(f"{name} must be {kind}, but got {name}={value!r}")
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, but got {name}={value!r}")


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """`value` is a finite number in the interval; ConfigError naming it otherwise."""
    if optional and value is None:
        return
    if not _is_number(value) or value != value:
        kind = "a number" + (" or None" if optional else "")
        raise ConfigError(f"{name} must be {kind}, but got {name}={value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        if high == math.inf:
            what = f"greater than {low:g}" if low_open else f"at least {low:g}"
        else:
            what = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be {what}, but got {name}={value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, but got {name}={value!r}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, but got {name}={value!r}")


@dataclass
class TrainConfig:
    """How one configuration is trained and evaluated.

    `n_folds` is the K of stratified grouped K-fold; `cv` says what a group is: "patient"
    (default) or "site" (acquisition site, so every validation fold holds only unseen sites;
    patients still never straddle). `holdout` (e.g. 0.2) replaces the K folds by one grouped
    train/validation split for quick searches. `max_folds` evaluates only the first folds of
    the K (a cheaper, noisier estimate). `augment` is the strength (0..1) of X-ray-safe
    augmentation (rotation, shift, scale, brightness/contrast; no flips); with `augment == 0`
    and frozen stages, the frozen stages' output is cached and reused (`feature_cache`).

    `early_stopping` is a patience in epochs (None = fixed epochs). It never looks at the
    fold it reports: each fold's training patients are split again (`inner_holdout`, a
    patient-grouped stratified fraction), the model trains on the rest, stops when the inner
    validation loss has not improved for `early_stopping` epochs, and the fold reports its
    outer validation metrics at the epoch with the best inner loss.

    `amp` is mixed precision on CUDA (bfloat16 where supported, else float16 with loss
    scaling). `cpu_amp` adds bfloat16 autocast on a CPU that computes bfloat16 natively
    (AVX512-BF16 or AMX, `cpu_bf16_supported`): the trained stages and the head run their
    convolutions and matrix products in bfloat16 with float32 weights, optimiser and losses
    (about 1.7x faster there), while cached frozen features stay float32 (computed once, and
    shared with float32 trials); elsewhere it changes nothing. The precision a trial ran in is
    in `TrialResult.precision`.

    `eval_batch_size` is the batch of inference-only passes (the frozen stages' features,
    validation, external sets): None picks `CPU_EVAL_BATCH` (16) on a CPU and 128 on CUDA.
    On one CPU thread 16 images a batch ran the cpu profile's backbones 1.7-1.9x faster than
    128 and held 0.5-0.7 GB less at the peak, with bit-identical outputs
    (`benchmarks/eval_batch.py`, benchmarks/RESULTS.md).

    De-confounding levers (the `robust` space; defaults change nothing): `roi` ("full",
    "lung_crop", "lung_mask") and `intensity` ("none", "equalize", "clahe") preprocess every
    image (`automl_cxr.lungs.Preprocess`; `segmenter` is the lung segmenter checkpoint, by
    default `<data-dir>/lungs/segmenter.pt`); `site_adversarial` in [0, 1] weighs a
    class-conditional site classifier trained through a gradient-reversal layer on the head's
    input features (0 = no second head). `source_balance` weighs each training image so that
    within every class each image source (Cohen, NIH, Kermany, ...) carries the same total
    weight (group-balanced training, as in Idrissi et al. 2022 and the group-reweighting
    baseline of Sagawa et al. 2020): a source that holds few images of a class (Cohen's
    non-COVID films beside NIH's) then counts as much as the large one, so "this source
    means that class" stops paying; each class's total weight is unchanged. `group_dro` > 0
    trains for the worst (source, class) group instead (online group DRO, Sagawa et al. 2020;
    `automl_cxr.engine._groups`) with that step size for the group weights; beside it
    `source_balance` and `class_weighting` have no effect (0 = off); `group_dro_adjust` is
    Sagawa et al.'s generalisation adjustment C (a group's loss counts as loss + C/sqrt(size)
    when the group weights are updated, so a small group the model fits easily still gains
    weight; 0 = none). `weight_average` > 0 evaluates, early-stops on and keeps an exponential
    moving average of the trained weights with that decay per update (`WeightAverage`; 0 = the
    weights as trained).
    """

    resolution: int = 224
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    class_weighting: bool = True
    augment: float = 0.0
    early_stopping: int | None = None
    inner_holdout: float = 0.15
    n_folds: int = 5
    holdout: float | None = None
    max_folds: int | None = None
    cv: str = "patient"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    cpu_amp: bool = False
    feature_cache: bool = True
    eval_batch_size: int | None = None
    roi: str = "full"
    intensity: str = "none"
    site_adversarial: float = 0.0
    source_balance: bool = False
    group_dro: float = 0.0
    group_dro_adjust: float = 0.0
    weight_average: float = 0.0
    segmenter: str | None = None

    def eval_batch(self, device_type: str) -> int:
        """The inference batch on a device of `device_type` ("cpu", "cuda", ...)."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return 128 if device_type == "cuda" else CPU_EVAL_BATCH

    def __post_init__(self) -> None:
        check_int("resolution", self.resolution, 32)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        if self.eval_batch_size is not None:
            check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("warmup_epochs", self.warmup_epochs, 0)
        check_int("seed", self.seed, 0)
        check_number("lr", self.lr, 0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0.0)
        check_number("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_number("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_number("augment", self.augment, 0.0, 1.0)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("cv", self.cv, CV_MODES)
        check_choice("roi", self.roi, ROI_MODES)
        check_choice("intensity", self.intensity, INTENSITY_MODES)
        check_number("site_adversarial", self.site_adversarial, 0.0, 1.0)
        check_number("group_dro", self.group_dro, 0.0, 10.0)
        check_number("group_dro_adjust", self.group_dro_adjust, 0.0, 10.0)
        check_number("weight_average", self.weight_average, 0.0, 1.0, high_open=True)
        if self.segmenter is not None and not isinstance(self.segmenter, str):
            self.segmenter = str(self.segmenter)
        for name in ("class_weighting", "amp", "cpu_amp", "feature_cache", "source_balance"):
            check_bool(name, getattr(self, name))
        check_int("early_stopping", self.early_stopping, 1, optional=True)
        check_number("inner_holdout", self.inner_holdout, 0.0, 0.5, low_open=True)
        if self.holdout is None:
            check_int("n_folds", self.n_folds, 2)
        else:
            check_number("holdout", self.holdout, 0.0, 0.5, low_open=True)
        check_int("max_folds", self.max_folds, 1, optional=True)
        if not isinstance(self.device, str) or (
            self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:")
        ):
            raise ConfigError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', but got {self.device!r}"
            )
        for f in fields(self):  # numpy scalars (Ray, Optuna) become plain Python numbers
            v = getattr(self, f.name)
            if _is_int(v) and not isinstance(v, int):
                setattr(self, f.name, int(v))
        self.lr = float(self.lr)
        self.weight_decay = float(self.weight_decay)
        self.momentum = float(self.momentum)
        self.label_smoothing = float(self.label_smoothing)
        self.augment = float(self.augment)
        self.site_adversarial = float(self.site_adversarial)
        self.group_dro = float(self.group_dro)
        self.group_dro_adjust = float(self.group_dro_adjust)
        self.weight_average = float(self.weight_average)
        self.inner_holdout = float(self.inner_holdout)
        if self.holdout is not None:
            self.holdout = float(self.holdout)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)
