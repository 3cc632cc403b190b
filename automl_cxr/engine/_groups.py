"""A fit's training loss, and the two levers that weigh it by image group.

- `source_balance` (fixed weights): within each class every image source carries the same
  total weight (`group_balance_weights`).
- `group_dro` (adaptive weights): group distributionally robust optimisation (Sagawa et al.
  2020, "Distributionally robust neural networks for group shifts", online algorithm 1). Every
  training image belongs to a group, its image source and its class (Cohen COVID-19, Cohen
  non-COVID, NIH non-COVID, ...). The group weights `q` start equal and, after every batch,
  each group's weight is multiplied by ``exp(eta * its mean loss in the batch)`` and
  renormalised; the batch loss is the `q`-weighted mean of the groups' mean losses. The idea:
  when a shortcut ("a figure-quality Cohen film is COVID-19") serves most images, the group
  where it fails (Cohen's non-COVID films) keeps the highest loss and gains weight. What gains
  weight is whichever group the model fits worst: in the measured runs that was mostly Cohen's
  COVID-19 films or NIH's, since a head on frozen features fits a small group easily
  (`results/generalisation/ROBUST.md` §6); `adjust` favours small groups. Within a group every
  image has one class and one source, so class weighting and `source_balance` have no effect
  beside it.

Both off, the loss is plain (class-weighted when asked) cross-entropy, as it always was.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from automl_cxr.data import PreparedDataset
from automl_cxr.engine._config import TrainConfig
from automl_cxr.engine._folds import group_balance_weights

__all__ = ["GroupDRO", "TrainingLoss", "source_class_groups"]


def source_class_groups(labels: np.ndarray, sources: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(group index per row, group names "source/class") of the rows' (source, class) pairs."""
    keys = [f"{s}/{c}" for s, c in zip(np.asarray(sources), np.asarray(labels), strict=True)]
    names, index = np.unique(keys, return_inverse=True)
    return index.astype(np.int64), [str(n) for n in names]


class GroupDRO:
    """Online group DRO (see the module's docstring).

    Args:
        groups: group index of every dataset row (only training rows are looked up).
        names: the groups' names, for the record.
        eta: step size of the group weights; must be positive.
        device: where the per-batch arithmetic runs.
        adjust: Sagawa et al.'s generalisation adjustment C: each group's loss counts as
            ``loss + C / sqrt(group size)`` when the weights are updated, so a small group that
            the model fits easily (its training loss falls fastest) still gains weight; 0 = none.
    """

    def __init__(
        self,
        groups: np.ndarray,
        names: list[str],
        eta: float,
        device: torch.device | str,
        adjust: float = 0.0,
    ) -> None:
        if not eta > 0:
            raise ValueError(f"eta must be positive, but got {eta=}")
        if not adjust >= 0:
            raise ValueError(f"adjust must be at least 0, but got {adjust=}")
        self.names, self.eta = list(names), float(eta)
        self.groups = torch.as_tensor(np.asarray(groups, dtype=np.int64), device=device)
        # the weights live as log-weights: exp(eta * loss) overflows for a loss in the hundreds
        # (a diverging first epoch), a softmax of summed steps does not
        self.log_q = torch.zeros(len(names), device=device)
        sizes = torch.bincount(self.groups[self.groups >= 0], minlength=len(names)).float()
        self.bonus = float(adjust) / sizes.clamp(min=1).sqrt()

    def loss(self, per_row: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The batch loss from the losses `per_row` of dataset rows `idx`. The group weights
        are updated first, on the detached group means; groups absent from the batch keep
        their weight and add nothing."""
        g = self.groups[idx]
        n = len(self.names)
        counts = torch.bincount(g, minlength=n).to(per_row.dtype)
        sums = torch.zeros(n, device=per_row.device, dtype=per_row.dtype).scatter_add(0, g, per_row)
        means = sums / counts.clamp(min=1)
        present = counts > 0
        with torch.no_grad():
            step = self.eta * (means.detach() + self.bonus)
            self.log_q = torch.where(present, self.log_q + step, self.log_q)
        # the present groups' weights renormalised, from the log-weights: a group whose weight
        # underflowed to 0 beside a dominant absent group must not leave 0 / 0
        w = torch.softmax(torch.where(present, self.log_q, -torch.inf), 0)
        return (w * means).sum()

    @property
    def q(self) -> torch.Tensor:
        """The group weights (they sum to 1)."""
        return torch.softmax(self.log_q, 0)

    def record(self) -> dict[str, float]:
        """The current group weights by group name."""
        return {n: round(float(v), 6) for n, v in zip(self.names, self.q.tolist(), strict=True)}


class TrainingLoss:
    """`loss(logits, labels, rows)` of one fit: cross-entropy with the class weights `weight`
    (or None), weighted by `cfg.source_balance` or `cfg.group_dro` over the training rows
    `fit_idx` of `dataset`."""

    def __init__(
        self,
        dataset: PreparedDataset,
        fit_idx: np.ndarray,
        cfg: TrainConfig,
        weight: torch.Tensor | None,
        device: torch.device,
    ) -> None:
        self.weight, self.smoothing = weight, cfg.label_smoothing
        self.dro: GroupDRO | None = None
        self.balance: torch.Tensor | None = None
        if cfg.group_dro == 0 and not cfg.source_balance:
            return
        sources = dataset.manifest["source"].to_numpy()[fit_idx].astype(str)
        labels = dataset.labels[fit_idx]
        if cfg.group_dro > 0:  # the groups of the training rows only (-1 elsewhere)
            groups = np.full(len(dataset), -1, dtype=np.int64)
            class_names = np.asarray(dataset.classes)[labels]
            groups[fit_idx], names = source_class_groups(class_names, sources)
            self.dro = GroupDRO(groups, names, cfg.group_dro, device, cfg.group_dro_adjust)
        else:
            w = np.zeros(len(dataset), dtype=np.float32)
            w[fit_idx] = group_balance_weights(labels, sources)
            self.balance = torch.from_numpy(w).to(device)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.dro is not None:  # the worst (source, class) group's loss
            per = F.cross_entropy(logits, y, label_smoothing=self.smoothing, reduction="none")
            return self.dro.loss(per, idx)
        if self.balance is None:
            return F.cross_entropy(logits, y, weight=self.weight, label_smoothing=self.smoothing)
        per = F.cross_entropy(  # the weighted mean, each image also weighted by its source
            logits, y, weight=self.weight, label_smoothing=self.smoothing, reduction="none"
        )
        cw = 1.0 if self.weight is None else self.weight[y]
        g = self.balance[idx]
        return (g * per).sum() / (g * cw).sum()
