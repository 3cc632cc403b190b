"""The optimizer and learning-rate schedule of a training run, from a `TrainConfig` (timm's
`create_optimizer_v2` and `create_scheduler_v2`, stepped per batch)."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from automl_cxr.engine._config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
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


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
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
