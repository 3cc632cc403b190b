"""Training configuration of one trial, validated up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from automl_cxr.errors import ConfigError

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "none")


@dataclass
class TrainConfig:
    """How one configuration is trained and evaluated.

    `n_folds` is the K of patient-grouped stratified K-fold; `holdout` (e.g. 0.2) replaces it by
    one grouped train/validation split for quick searches. `max_folds` evaluates only the first
    folds of the K (a cheaper, noisier estimate). `augment` is the strength (0..1) of X-ray-safe
    augmentation (rotation, shift, scale, brightness/contrast; no flips); with `augment == 0`
    and frozen stages, the frozen stages' output is cached and reused (`feature_cache`).
    `early_stopping` is a patience in epochs on the validation loss (None = fixed epochs).
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
    n_folds: int = 5
    holdout: float | None = None
    max_folds: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    feature_cache: bool = True
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        def at_least(name: str, lo: float) -> None:
            v = getattr(self, name)
            if v < lo:
                raise ConfigError(f"{name} must be at least {lo}, but got {name}={v!r}")

        at_least("resolution", 32)
        at_least("epochs", 1)
        at_least("batch_size", 1)
        at_least("eval_batch_size", 1)
        at_least("weight_decay", 0.0)
        at_least("warmup_epochs", 0)
        if not self.lr > 0 or self.lr != self.lr:
            raise ConfigError(f"lr must be positive, but got lr={self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, but got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, but got {self.schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"label_smoothing must be in [0, 1), but got label_smoothing={self.label_smoothing}"
            )
        if not 0.0 <= self.augment <= 1.0:
            raise ConfigError(f"augment must be in [0, 1], but got augment={self.augment}")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise ConfigError(
                f"early_stopping must be at least 1 or None, but got {self.early_stopping}"
            )
        if self.holdout is None:
            at_least("n_folds", 2)
        elif not 0.0 < self.holdout <= 0.5:
            raise ConfigError(f"holdout must be in (0, 0.5], but got holdout={self.holdout}")
        if self.max_folds is not None and self.max_folds < 1:
            raise ConfigError(f"max_folds must be at least 1, but got max_folds={self.max_folds}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', but got {self.device!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)
