"""The optimizer and learning-rate schedule of a training run, from a `TrainConfig` (timm's
`create_optimizer_v2` and `create_scheduler_v2`, stepped per batch)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from automl_cxr.engine._config import TrainConfig

__all__ = ["WeightAverage", "build_optimizer", "build_scheduler", "state_copy"]


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


def state_copy(net: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `net`'s state (weights and buffers), e.g. a chosen epoch's model."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


class WeightAverage:
    """An exponential moving average of a network's weights over training updates (Polyak
    averaging; Izmailov et al. 2018 and Cha et al. 2021, "SWAD", for why averaged weights
    generalise better to unseen domains). `decay` per update, warmed up as TensorFlow's
    `ExponentialMovingAverage(num_updates=...)` does (`min(decay, (1 + t) / (10 + t))` at
    update t), so the random initial head does not linger; floating-point tensors of the state
    are averaged, integer buffers (BatchNorm's counter) copied. Only what training can change
    is visited: the trainable parameters and the buffers of modules in training mode at the
    first update (a frozen backbone's weights and its eval-mode BatchNorm statistics stay as
    copied at the start). `swapped(net)` puts the average into `net` for evaluation and
    restores the trained weights after."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay, self.updates = float(decay), 0
        self.avg = state_copy(net)
        self.moving: tuple[str, ...] | None = None  # set at the first update

    @staticmethod
    def _moving(net: nn.Module) -> tuple[str, ...]:
        """State keys training can change: trainable parameters, training modules' buffers."""
        keys = {k for k, p in net.named_parameters(remove_duplicate=False) if p.requires_grad}
        for name, m in net.named_modules(remove_duplicate=False):
            if m.training:
                keys.update(f"{name}.{b}" if name else b for b, _ in m.named_buffers(recurse=False))
        return tuple(k for k in net.state_dict() if k in keys)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        if self.moving is None:
            self.moving = self._moving(net)
        state = net.state_dict()
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k in self.moving:
            v = state[k]
            if v.is_floating_point():
                self.avg[k].lerp_(v, 1 - d)
            else:
                self.avg[k].copy_(v)
        self.updates += 1

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the averaged state."""
        return {k: v.clone() for k, v in self.avg.items()}

    @contextlib.contextmanager
    def swapped(self, net: nn.Module):
        live = state_copy(net)
        net.load_state_dict(self.avg)
        try:
            yield net
        finally:
            net.load_state_dict(live)
