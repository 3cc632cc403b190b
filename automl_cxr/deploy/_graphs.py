"""Exported graphs built around trained models: temperature scaling (the weighted ensemble of
different trials is `automl_cxr.models.WeightedEnsemble`). It traces to TorchScript and
exports to ONNX like the plain models; its output is "logits" whose softmax is the calibrated
probability, so every consumer of a model's logits works unchanged."""

from __future__ import annotations

import torch
from torch import nn

from automl_cxr.errors import ConfigError

__all__ = ["TemperatureScaled", "unwrap"]


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


def unwrap(model: nn.Module) -> tuple[nn.Module, float | None]:
    """(the model inside a TemperatureScaled wrapper, its temperature) — or (model, None); a
    preprocessing wrapper (`automl_cxr.lungs.Preprocessed`) is looked through."""
    inner = getattr(model, "preprocess", None)
    if inner is not None and hasattr(model, "model"):
        model = model.model
    if isinstance(model, TemperatureScaled):
        return model.model, float(model.temperature)
    return model, None
