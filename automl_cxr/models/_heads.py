"""Classification heads: a registry where a new head is one small function.

A head function takes `(num_features, num_classes, **options)` and returns a module mapping
the backbone's feature map (B, C, h, w) — or tokens (B, N, C) — to logits (B, num_classes).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from automl_cxr.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "POOLS",
    "FeaturePool",
    "PooledHead",
    "build_head",
    "combine_pooled",
    "list_heads",
    "pool_vectors",
    "register_head",
]

HeadFn = Callable[..., nn.Module]

POOLS = ("avg", "max", "avgmax")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
_TIMM_POOL = {"avg": "avg", "max": "max", "avgmax": "catavgmax"}  # timm's "avgmax" averages

_HEADS: dict[str, HeadFn] = {}


def register_head(name: str) -> Callable[[HeadFn], HeadFn]:
    """Decorator: register `fn(num_features, num_classes, **options) -> nn.Module` as `name`."""

    def deco(fn: HeadFn) -> HeadFn:
        _HEADS[name] = fn
        return fn

    return deco


def list_heads() -> list[str]:
    return sorted(_HEADS)


def build_head(name: str, num_features: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build head `name`; unknown names, unknown options and bad values raise ConfigError."""
    fn = _HEADS.get(name)
    if fn is None:
        close = difflib.get_close_matches(str(name), list(_HEADS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown head {name!r}{hint}; allowed: {', '.join(list_heads())}")
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        allowed = [k for k in params if k not in ("num_features", "num_classes")]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ConfigError(
                f"head {name!r} got unknown option(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(allowed) or '(none)'}"
            )
    _check_int(name, "num_features", num_features, 1)
    _check_int(name, "num_classes", num_classes, 1)
    return fn(num_features, num_classes, **kwargs)


# -- validation helpers ----------------------------------------------------------------------


def _check_choice(head: str, key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> str:
    if value not in allowed:
        raise ConfigError(
            f"head {head!r}: {key} must be one of {', '.join(allowed)}, but got {key}={value!r}"
        )
    return value


def _check_int(head: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(
            f"head {head!r}: {key} must be an integer of at least {low}, but got {key}={value!r}"
        )
    return value


def _check_dropout(head: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"head {head!r}: dropout must be in [0, 1), but got dropout={value!r}")
    return float(value)


def _check_bool(head: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"head {head!r}: {key} must be true or false, but got {key}={value!r}")
    return value


# -- building blocks ---------------------------------------------------------------------------


class FeaturePool(nn.Module):
    """Global pooling of a feature map (B, C, h, w) or tokens (B, N, C) into (B, C·k).

    `avgmax` concatenates average and max pooling (k = 2).
    """

    def __init__(self, pool: str = "avg") -> None:
        super().__init__()
        self.pool_type = pool
        self.pool2d = SelectAdaptivePool2d(pool_type=_TIMM_POOL[pool], flatten=True)

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "avgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.pool2d(x)
        if x.ndim == 3:  # tokens
            if self.pool_type == "avg":
                return x.mean(1)
            if self.pool_type == "max":
                return x.amax(1)
            return torch.cat([x.mean(1), x.amax(1)], dim=1)
        if x.ndim == 2 and self.pool_type != "avgmax":
            return x
        raise ConfigError(f"cannot pool features of shape {tuple(x.shape)} with {self.pool_type}")


def pool_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(avg, max) pooled vectors (B, C) of a feature map (B, C, h, w) or tokens (B, N, C):
    `FeaturePool(p)(x)` is `avg`, `max` or `cat([avg, max], 1)` for p = avg, max, avgmax."""
    if x.ndim == 4:
        return x.mean((2, 3)), x.amax((2, 3))
    if x.ndim == 3:
        return x.mean(1), x.amax(1)
    raise ConfigError(f"cannot pool features of shape {tuple(x.shape)}")


def combine_pooled(pair: torch.Tensor, pool: str) -> torch.Tensor:
    """What `FeaturePool(pool)` returns, from the (N, 2, C) stack of `pool_vectors`' avg and
    max vectors: a view of `pair` (no copy: a large cached, memory-mapped stack stays shared)."""
    _check_choice("pool", "pool", pool, POOLS)
    return pair[:, 0] if pool == "avg" else pair[:, 1] if pool == "max" else pair.flatten(1)


class PooledHead(nn.Module):
    """`pool` then `classifier` (a small MLP ending in the class logits)."""

    def __init__(self, pool: FeaturePool, classifier: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))


# -- the built-in heads --------------------------------------------------------------------------


@register_head("linear")
def linear_head(
    num_features: int,
    num_classes: int,
    pool: str = "avg",
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Module:
    """Pool → [BatchNorm] → dropout → linear classifier (the classic transfer-learning head)."""
    pool_m = FeaturePool(_check_choice("linear", "pool", pool, POOLS))
    width = num_features * pool_m.feat_mult()
    layers: list[nn.Module] = []
    if _check_bool("linear", "batchnorm", batchnorm):
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.Dropout(_check_dropout("linear", dropout)), nn.Linear(width, num_classes)]
    return PooledHead(pool_m, nn.Sequential(*layers))


@register_head("mlp")
def mlp_head(
    num_features: int,
    num_classes: int,
    pool: str = "avg",
    hidden: int = 256,
    dropout: float = 0.0,
    activation: str = "relu",
    batchnorm: bool = False,
) -> nn.Module:
    """Pool → linear(hidden) → [BatchNorm] → activation → dropout → linear classifier."""
    pool_m = FeaturePool(_check_choice("mlp", "pool", pool, POOLS))
    width = num_features * pool_m.feat_mult()
    hidden = _check_int("mlp", "hidden", hidden, 1)
    act = ACTIVATIONS[_check_choice("mlp", "activation", activation, tuple(ACTIVATIONS))]
    layers: list[nn.Module] = [nn.Linear(width, hidden)]
    if _check_bool("mlp", "batchnorm", batchnorm):
        layers.append(nn.BatchNorm1d(hidden))
    layers += [act(), nn.Dropout(_check_dropout("mlp", dropout)), nn.Linear(hidden, num_classes)]
    return PooledHead(pool_m, nn.Sequential(*layers))
