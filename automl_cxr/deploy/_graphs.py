"""Exported graphs built around trained models: temperature scaling and a weighted ensemble of
different trials (Caruana selection). Both trace to TorchScript and export to ONNX like the
plain models; their outputs are "logits" whose softmax is the calibrated / averaged
probability, so every consumer of a model's logits works unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from automl_cxr.errors import ConfigError

__all__ = ["TemperatureScaled", "WeightedEnsemble", "unwrap"]


class TemperatureScaled(nn.Module):
    """``model(x) / T``: softmax of it is ``softmax(logits / T)`` (Guo et al. 2017); for a
    model whose output is log-probabilities (an ensemble) the same holds. The arg-max is
    unchanged."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"temperature must be positive, but got {temperature}")
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @property
    def config(self):
        return self.model.config

    def param_counts(self) -> tuple[int, int]:
        return self.model.param_counts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float() / self.temperature


class WeightedEnsemble(nn.Module):
    """Members of any configuration (one input resolution), combined as the weighted mean of
    their softmax probabilities; ``forward`` returns its log (like `CxrEnsemble`)."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        members = list(members)
        w = [float(v) for v in weights]
        if not members or len(w) != len(members):
            raise ConfigError(
                f"a weighted ensemble needs one weight per member, but got {len(members)} "
                f"members and {len(w)} weights"
            )
        if any(v < 0 for v in w) or sum(w) <= 0:
            raise ConfigError(f"ensemble weights must be non-negative with a positive sum: {w}")
        classes = {m.config.num_classes for m in members}
        if len(classes) != 1:
            raise ConfigError(f"ensemble members predict different numbers of classes: {classes}")
        self.members = nn.ModuleList(members)
        total = sum(w)
        self.register_buffer("weights", torch.tensor([v / total for v in w]))
        self.config = members[0].config

    def __len__(self) -> int:
        return len(self.members)

    def param_counts(self) -> tuple[int, int]:
        counts = [m.param_counts() for m in self.members]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members])
        mixed = (probs * self.weights[:, None, None]).sum(dim=0)
        return torch.log(mixed.clamp_min(1e-12))


def unwrap(model: nn.Module) -> tuple[nn.Module, float | None]:
    """(the model inside a TemperatureScaled wrapper, its temperature) — or (model, None); a
    preprocessing wrapper (`automl_cxr.lungs.Preprocessed`) is looked through."""
    inner = getattr(model, "preprocess", None)
    if inner is not None and hasattr(model, "model"):
        model = model.model
    if isinstance(model, TemperatureScaled):
        return model.model, float(model.temperature)
    return model, None
