"""Ensembles of trained models: a weighted mixture of members' probabilities (Caruana
selection across trials) and its equal-weight case, the fold ensemble of one configuration."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from automl_cxr.errors import ConfigError
from automl_cxr.models._builder import CxrModel, ModelConfig

__all__ = ["CxrEnsemble", "WeightedEnsemble"]


class WeightedEnsemble(nn.Module):
    """Members of any configuration (one input resolution), combined as the weighted mean of
    their softmax probabilities.

    `forward` returns ``log(sum_k w_k softmax(member_k(x)))``: log-probabilities, so that a
    softmax of the output (what every consumer of a model's "logits" does) gives exactly the
    mixed probabilities, and the arg-max is the ensemble's prediction. Same input contract as
    `CxrModel`: (B, 1, H, W) gray images in [0, 1]. The weights (normalised to sum 1) are part
    of the state dict.
    """

    def __init__(
        self, members: Sequence[nn.Module], weights: Sequence[float], *, _persistent: bool = True
    ) -> None:
        super().__init__()
        members = list(members)
        w = [float(v) for v in weights]
        if not members:
            raise ConfigError("an ensemble needs at least 1 member, but got 0")
        if len(w) != len(members):
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
        self.register_buffer(
            "weights", torch.tensor([v / total for v in w]), persistent=_persistent
        )
        self.config = members[0].config

    def __len__(self) -> int:
        return len(self.members)

    def param_counts(self) -> tuple[int, int]:
        """(total, trainable) parameters summed over the members."""
        counts = [m.param_counts() for m in self.members]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def mix(self, probs: torch.Tensor) -> torch.Tensor:
        """The members' probabilities (K, B, C) mixed into the ensemble's (B, C)."""
        return (probs * self.weights[:, None, None]).sum(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members])
        return torch.log(self.mix(probs).clamp_min(1e-12))


class CxrEnsemble(WeightedEnsemble):
    """A fold ensemble: the K models of one `ModelConfig`'s cross-validation, equally
    weighted (their weights are not stored: the state dict holds the members only)."""

    def __init__(self, members: Sequence[CxrModel]) -> None:
        members = list(members)
        if members:
            first = members[0].config.to_dict()
            for i, m in enumerate(members[1:], start=1):
                if m.config.to_dict() != first:
                    raise ConfigError(
                        f"ensemble members must share one model configuration, but member {i} "
                        f"has {m.config.to_dict()} and member 0 has {first}"
                    )
        super().__init__(members, [1.0] * len(members), _persistent=False)

    def mix(self, probs: torch.Tensor) -> torch.Tensor:
        """The plain mean (as fold ensembles were always exported)."""
        return probs.mean(dim=0)

    @classmethod
    def from_config(cls, config: ModelConfig, k: int) -> CxrEnsemble:
        """K freshly built members (no pretrained weights loaded), ready for `load_state_dict`."""
        from automl_cxr.models._builder import build_model

        if k < 1:
            raise ConfigError(f"an ensemble needs at least 1 member, but got k={k}")
        cfg = ModelConfig.from_dict({**config.to_dict(), "pretrained": False, "weights_file": None})
        return cls([build_model(cfg) for _ in range(k)])
