"""A fold ensemble: the K models of one configuration's cross-validation, averaged."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from automl_cxr.errors import ConfigError
from automl_cxr.models._builder import CxrModel, ModelConfig

__all__ = ["CxrEnsemble"]


class CxrEnsemble(nn.Module):
    """Members with one `ModelConfig`, combined by averaging their softmax probabilities.

    `forward` returns ``log(mean_k softmax(member_k(x)))``: log-probabilities, so that a softmax
    of the output (what every consumer of a model's "logits" does) gives exactly the averaged
    probabilities, and the arg-max is the ensemble's prediction. Same input contract as
    `CxrModel`: (B, 1, H, W) gray images in [0, 1].
    """

    def __init__(self, members: Sequence[CxrModel]) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ConfigError("an ensemble needs at least 1 member, but got 0")
        first = members[0].config.to_dict()
        for i, m in enumerate(members[1:], start=1):
            if m.config.to_dict() != first:
                raise ConfigError(
                    f"ensemble members must share one model configuration, but member {i} has "
                    f"{m.config.to_dict()} and member 0 has {first}"
                )
        self.members = nn.ModuleList(members)
        self.config: ModelConfig = members[0].config

    def __len__(self) -> int:
        return len(self.members)

    def param_counts(self) -> tuple[int, int]:
        """(total, trainable) parameters summed over the members."""
        counts = [m.param_counts() for m in self.members]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members])
        return torch.log(probs.mean(dim=0).clamp_min(1e-12))

    @classmethod
    def from_config(cls, config: ModelConfig, k: int) -> CxrEnsemble:
        """K freshly built members (no pretrained weights loaded), ready for `load_state_dict`."""
        from automl_cxr.models._builder import build_model

        if k < 1:
            raise ConfigError(f"an ensemble needs at least 1 member, but got k={k}")
        cfg = ModelConfig.from_dict({**config.to_dict(), "pretrained": False, "weights_file": None})
        return cls([build_model(cfg) for _ in range(k)])
