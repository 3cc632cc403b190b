"""The `site_adversarial` lever: a class-conditional site classifier trained through a
gradient-reversal layer (Ganin & Lempitsky 2015, conditioned on the class as in Li et al. 2018)
on the features the classifier's last linear layer reads.

Within each class, the adversary learns to tell the training sites apart; the reversed gradient
pushes the trainable part of the model to remove what tells them apart *within a class*, so
the class itself is left alone. It needs no backbone gradient: on cached frozen features it
trains the head's hidden layer (an MLP head) or the trainable stages, whatever feeds the last
linear layer. A weight of 0 builds no second head at all.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GradReverse", "SiteAdversary", "SiteTraining", "grad_reverse", "last_linear"]


class GradReverse(torch.autograd.Function):
    """Identity forward; the gradient times `-scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return GradReverse.apply(x, scale)


def last_linear(net: nn.Module) -> nn.Linear | None:
    """The last `nn.Linear` of `net` (the classifier's output layer), or None."""
    found = None
    for m in net.modules():
        if isinstance(m, nn.Linear):
            found = m
    return found


class SiteAdversary(nn.Module):
    """(features (B, D), class (B,)) → site logits (B, S) of each row's own class block, from
    features passed through gradient reversal."""

    def __init__(self, in_features: int, n_classes: int, n_sites: int, hidden: int = 64) -> None:
        super().__init__()
        self.n_classes, self.n_sites = n_classes, n_sites
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes * n_sites)
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.net(grad_reverse(z.float())).view(-1, self.n_classes, self.n_sites)
        return out[torch.arange(len(y), device=y.device), y]


class SiteTraining:
    """Everything one fold needs for the adversarial loss: the adversary, its optimiser, the
    training rows' site codes, and a hook that captures the last linear layer's input."""

    def __init__(
        self,
        net: nn.Module,
        sites: np.ndarray,
        fit_idx: np.ndarray,
        n_classes: int,
        weight: float,
        lr: float,
        seed: int,
        device: torch.device,
    ) -> None:
        names, codes = np.unique(np.asarray(sites)[fit_idx], return_inverse=True)
        self.n_sites = len(names)
        self.weight = float(weight)
        lin = last_linear(net)
        self.active = self.weight > 0 and self.n_sites >= 2 and lin is not None
        self.codes = torch.full((len(sites),), -1, dtype=torch.long, device=device)
        if not self.active:
            return
        self.codes[torch.as_tensor(np.array(fit_idx), device=device)] = torch.as_tensor(
            codes, dtype=torch.long, device=device
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adv = SiteAdversary(lin.in_features, n_classes, self.n_sites).to(device)
        self.opt = torch.optim.AdamW(self.adv.parameters(), lr=lr, weight_decay=1e-4)
        self._z: torch.Tensor | None = None
        self._hook = lin.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs, output) -> None:
        if module.training:
            self._z = inputs[0]

    def loss(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The weighted site loss of the batch just forwarded (None when inactive)."""
        if not self.active or self._z is None:
            return None
        z, self._z = self._z, None
        logits = self.adv(z, y)
        return self.weight * F.cross_entropy(logits.float(), self.codes[idx])

    def step(self) -> None:
        if self.active:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.active:
            self._hook.remove()
            self._z = None
