"""`build_model(ModelConfig)` → `CxrModel`: gray input → normalisation → timm backbone → head."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from automl_cxr.errors import ConfigError
from automl_cxr.models._catalogue import BackboneSpec, get_backbone
from automl_cxr.models._freeze import (
    ArchInfo,
    FreezePlan,
    arch_info,
    check_frozen_stages,
    freeze_plan,
)
from automl_cxr.models._heads import PooledHead, build_head, list_heads
from automl_cxr.models._load import load_backbone
from automl_cxr.models._weights import WeightSource, resolve_weights

__all__ = ["GRAY_MODES", "CxrModel", "GrayNormalize", "ModelConfig", "build_model"]

_log = logging.getLogger(__name__)

GRAY_MODES = ("replicate", "sum")


@dataclass
class ModelConfig:
    """Everything that defines a model: backbone, frozen depth, head, weights, gray mode.

    `frozen_stages` freezes the backbone's first N coarse stages (0 = fine-tune everything,
    `num_stages(backbone)` = train the head only). `gray_mode` "replicate" feeds the gray image
    as 3 identical channels; "sum" builds a 1-channel stem whose kernels are the summed RGB
    kernels (timm `in_chans=1`). `pretrained=False` is the only way to get random weights.
    """

    backbone: str
    num_classes: int
    frozen_stages: int = 0
    head: str = "linear"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = True
    weights_file: str | None = None
    gray_mode: str = "replicate"
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str):
            raise ConfigError(f"backbone must be a name (str), but got backbone={self.backbone!r}")
        get_backbone(self.backbone)  # unknown names fail here, with close matches
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ConfigError(
                f"num_classes must be an integer, but got num_classes={self.num_classes!r}"
            )
        if self.num_classes < 1:
            raise ConfigError(
                f"num_classes must be at least 1, but got num_classes={self.num_classes}"
            )
        if isinstance(self.frozen_stages, bool) or not isinstance(self.frozen_stages, int):
            raise ConfigError(
                f"frozen_stages must be an integer, but got frozen_stages={self.frozen_stages!r}"
            )
        if self.frozen_stages < 0:
            raise ConfigError(
                f"frozen_stages must be at least 0, but got frozen_stages={self.frozen_stages}"
            )
        check_frozen_stages(self.backbone, self.frozen_stages)  # ≤ the backbone's stages
        if not isinstance(self.head, str):
            raise ConfigError(f"head must be a name (str), but got head={self.head!r}")
        if self.head not in list_heads():
            build_head(self.head, 8, self.num_classes)  # raises, listing the allowed heads
        if not isinstance(self.head_kwargs, dict):
            raise ConfigError(
                f"head_kwargs must be a mapping, but got head_kwargs={self.head_kwargs!r}"
            )
        bad_keys = [k for k in self.head_kwargs if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"head_kwargs keys must be option names (str), but got {bad_keys!r}")
        self.head_kwargs = dict(self.head_kwargs)
        build_head(self.head, 8, self.num_classes, **self.head_kwargs)  # validates the options
        if not isinstance(self.pretrained, bool):
            raise ConfigError(
                f"pretrained must be true or false, but got pretrained={self.pretrained!r}"
            )
        if isinstance(self.weights_file, Path):
            self.weights_file = str(self.weights_file)
        if self.weights_file is not None and not isinstance(self.weights_file, str):
            raise ConfigError(
                f"weights_file must be a path or None, but got weights_file={self.weights_file!r}"
            )
        if self.weights_file is not None and not self.pretrained:
            raise ConfigError(
                f"weights_file={self.weights_file!r} is given but pretrained=False; "
                "set pretrained=True to load it"
            )
        if self.gray_mode not in GRAY_MODES:
            raise ConfigError(
                f"gray_mode must be one of {', '.join(GRAY_MODES)}, "
                f"but got gray_mode={self.gray_mode!r}"
            )
        rate = self.drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ConfigError(f"drop_path_rate must be in [0, 1), but got drop_path_rate={rate!r}")
        self.drop_path_rate = float(rate)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["head_kwargs"] = dict(self.head_kwargs)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown model option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
            )
        return cls(**data)


class GrayNormalize(nn.Module):
    """(B, 1, H, W) in [0, 1] → the backbone's normalised input.

    "replicate": 3 channels, each normalised with its own mean/std (broadcasting does the
    replication). "sum": 1 channel, normalised with the channel-averaged mean/std — exactly
    equivalent to "replicate" with summed stem kernels when mean/std are the same for all
    channels (Inception, EfficientNet-Lite), close otherwise (ImageNet statistics).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], mode: str) -> None:
        super().__init__()
        self.mode = mode
        m = torch.tensor(mean, dtype=torch.float32)
        s = torch.tensor(std, dtype=torch.float32)
        if mode == "sum":
            m, s = m.mean().reshape(1), s.mean().reshape(1)
        self.register_buffer("mean", m.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", s.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != 1):
            raise ConfigError(f"expected gray images of shape (B, 1, H, W), got {tuple(x.shape)}")
        return (x - self.mean) / self.std


class _ToChannelsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class _ForwardFeatures(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


class FrozenPrefix(nn.Sequential):
    """Normalisation + the frozen stages; always in eval mode (deterministic, fixed BN)."""

    def train(self, mode: bool = True) -> FrozenPrefix:
        return super().train(False)


class TrainableRest(nn.Module):
    """The trainable stages (if any), the feature-layout adapter, and the head."""

    def __init__(self, stages: nn.Module, neck: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stages = stages
        self.neck = neck
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.stages(x)))


class CxrModel(nn.Module):
    """A chest X-ray classifier: `forward` takes gray images (B, 1, H, W) in [0, 1] and
    returns logits (B, num_classes); normalisation happens inside.

    The first `frozen_stages` coarse stages of the backbone are frozen: no gradients, and
    kept in eval mode (BatchNorm statistics fixed) whatever `train()` is called with.
    """

    def __init__(
        self,
        config: ModelConfig,
        spec: BackboneSpec,
        backbone: nn.Module,
        head: nn.Module,
        info: ArchInfo,
        weight_source: WeightSource,
    ) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.weight_source = weight_source
        self.num_features = info.num_features
        self.num_stages = info.num_stages
        self.frozen_stages = config.frozen_stages
        self.input_norm = GrayNormalize(spec.mean, spec.std, config.gray_mode)
        self.backbone = backbone
        self.neck = _ToChannelsFirst() if info.layout == "NHWC" else nn.Identity()
        self.head = head
        self._info = info
        self._plan: FreezePlan = freeze_plan(info, config.frozen_stages)
        self._chain_ok: bool | None = None
        for name, p in self.backbone.named_parameters():
            if name in self._plan.tensors:
                p.requires_grad_(False)
        self._frozen_modules = [self.backbone.get_submodule(n) for n in self._plan.modules]
        self.train()

    # -- modes and counts ------------------------------------------------------------------

    def train(self, mode: bool = True) -> CxrModel:
        super().train(mode)
        for m in getattr(self, "_frozen_modules", ()):
            m.eval()  # frozen stages (BatchNorm included) never leave eval mode
        return self

    def param_counts(self) -> tuple[int, int]:
        """(total, trainable) parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable

    def no_weight_decay(self) -> set[str]:
        """Parameter names the backbone asks to keep free of weight decay (timm's convention,
        e.g. a ViT's position embedding); biases and norm layers are excluded anyway."""
        names = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in names()} if callable(names) else set()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map (or tokens) for gray images (B, 1, H, W) in [0, 1]."""
        return self.backbone.forward_features(self.input_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.forward_features(x)))

    # -- frozen-feature caching --------------------------------------------------------------

    def split_frozen(self) -> tuple[nn.Module, nn.Module] | None:
        """(prefix, rest) with `rest(prefix(x)) == self(x)` (eval mode), or None.

        `prefix` (always eval, all parameters frozen) maps gray images to the output of the
        frozen stages; `rest` holds exactly the trainable parameters. None when nothing is
        frozen, or when the backbone's `forward_features` is not a plain chain of modules that
        can be cut after stage `frozen_stages`. The modules are shared with this model.
        """
        plan = self._plan
        if plan.frozen == 0:
            return None
        if plan.frozen >= self.num_stages:
            prefix = FrozenPrefix(self.input_norm, _ForwardFeatures(self.backbone))
            return prefix, TrainableRest(nn.Identity(), self.neck, self.head)
        if plan.split is None or not self._chain_matches():
            return None
        chain = [self.backbone.get_submodule(n) for n in self._info.sequence or ()]
        prefix = FrozenPrefix(self.input_norm, *chain[: plan.split])
        rest = TrainableRest(nn.Sequential(*chain[plan.split :]), self.neck, self.head)
        return prefix, rest

    def frozen_part(self, start: int, stop: int) -> nn.Module | None:
        """The frozen stages `start`..`stop`: a module (eval mode, shared with this model)
        mapping the output of the first `start` stages (gray images when `start` is 0) to the
        output of the first `stop` stages, `0 <= start < stop <= frozen_stages`; None when
        the backbone cannot be cut at both depths. `frozen_part(0, frozen_stages)` is
        `split_frozen()[0]`. The feature cache uses it to compute a deeper depth's features
        from a shallower depth's cached ones instead of from pixels."""
        if not (0 <= start < stop <= self.frozen_stages):
            raise ConfigError(
                f"frozen_part needs 0 <= start < stop <= frozen_stages={self.frozen_stages}, "
                f"but got start={start}, stop={stop}"
            )
        if start == 0 and stop >= self.num_stages:
            return FrozenPrefix(self.input_norm, _ForwardFeatures(self.backbone))
        cuts = [self._cut(d) for d in (start, stop)]
        if None in cuts or not self._chain_matches():
            return None
        chain = [self.backbone.get_submodule(n) for n in self._info.sequence or ()]
        head = [self.input_norm] if start == 0 else []
        return FrozenPrefix(*head, *chain[cuts[0] : cuts[1]])

    def _cut(self, depth: int) -> int | None:
        """Index into the backbone's module chain right after its first `depth` stages."""
        if self._info.sequence is None:
            return None
        if depth == 0:
            return 0
        if depth >= self.num_stages:
            return len(self._info.sequence)
        return freeze_plan(self._info, depth).split

    def pooled_head(self) -> tuple[str, nn.Module] | None:
        """(pool, classifier) when every stage is frozen and the head is a `PooledHead`: the
        classifier then sees only the pooled feature vector, so trials can train it on
        cached pooled features (avg and max; avgmax is their concatenation). Else None."""
        if self.frozen_stages < self.num_stages or not isinstance(self.head, PooledHead):
            return None
        return self.head.pool.pool_type, self.head.classifier

    @torch.no_grad()
    def _chain_matches(self) -> bool:
        """Check once, on a small random input, that the module chain is forward_features."""
        if self._chain_ok is None:
            chain = [self.backbone.get_submodule(n) for n in self._info.sequence or ()]
            modes = {m: m.training for m in self.modules()}
            self.eval()
            try:
                p = next(self.parameters())
                size = self._info.probe_size
                gen = torch.Generator().manual_seed(0)
                x = torch.rand(2, 1, size, size, generator=gen).to(p.device, p.dtype)
                with torch.autocast(p.device.type, enabled=False):
                    x = self.input_norm(x)
                    ref = self.backbone.forward_features(x)
                    out = x
                    for m in chain:
                        out = m(out)
                scale = ref.abs().max().clamp(min=1e-6)
                self._chain_ok = out.shape == ref.shape and bool(
                    torch.allclose(out, ref, rtol=1e-3, atol=1e-4 * float(scale))
                )
            except Exception as exc:  # a chain that does not even run is not a chain
                _log.debug("split_frozen: chain check failed for %s: %s", self.spec.name, exc)
                self._chain_ok = False
            finally:
                for m, mode in modes.items():
                    m.training = mode
            if not self._chain_ok:
                _log.info("split_frozen: %s cannot be split generically", self.spec.name)
        return self._chain_ok

    def describe(self) -> dict[str, Any]:
        total, trainable = self.param_counts()
        return {
            "backbone": self.spec.name,
            "family": self.spec.family,
            "num_features": self.num_features,
            "num_stages": self.num_stages,
            "frozen_stages": self.frozen_stages,
            "params_total": total,
            "params_trainable": trainable,
            "weights": dataclasses.asdict(self.weight_source),
        }


def _drop_unused(info: ArchInfo) -> Callable[[nn.Module], None]:
    """Replace the modules `forward_features` never uses (timm head parts) by Identity."""

    def prepare(model: nn.Module) -> None:
        for name in info.unused:
            parent, _, child = name.rpartition(".")
            (model.get_submodule(parent) if parent else model).add_module(child, nn.Identity())

    return prepare


def build_model(config: ModelConfig) -> CxrModel:
    """A ready `CxrModel` for `config` (weights resolved as in `resolve_weights`)."""
    spec = get_backbone(config.backbone)
    info = arch_info(spec.arch)
    check_frozen_stages(spec.name, config.frozen_stages)
    in_chans = 1 if config.gray_mode == "sum" else 3
    kwargs: dict[str, Any] = {}
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    prepare = _drop_unused(info)
    try:
        if config.pretrained:
            source = resolve_weights(spec.name, config.weights_file)
            backbone, source = load_backbone(
                spec, source, in_chans=in_chans, skip=info.unused, prepare=prepare, **kwargs
            )
        else:
            backbone = timm.create_model(
                spec.name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs
            )
            prepare(backbone)
            source = WeightSource("random", spec.name, None, "random init (pretrained=False)")
    except TypeError as exc:
        if kwargs and "drop_path_rate" in str(exc):
            raise ConfigError(
                f"drop_path_rate is not supported by backbone {spec.name}, "
                f"but got drop_path_rate={config.drop_path_rate}"
            ) from None
        raise
    head = build_head(config.head, info.num_features, config.num_classes, **config.head_kwargs)
    return CxrModel(config, spec, backbone, head, info, source)
