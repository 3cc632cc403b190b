"""Hardware profiles: resolution, epochs, folds, backbones and batch size for a machine."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from automl_cxr.errors import ConfigError

__all__ = ["Profile", "default_profile", "get_profile", "list_profiles", "profile_workers"]


@dataclass(frozen=True)
class Profile:
    """Defaults a search space can override. `max_per_class` subsamples the dataset by patient
    (deterministically) for quick runs; None uses every image. With `backbones_from_profile`
    the profile's backbones (those with weights here) replace a space's own list, so a study
    file written for a GPU (e.g. the paper's five CNNs) runs unchanged on a CPU machine;
    `min_frozen_fraction` keeps such a space to the frozen depths the machine can afford."""

    name: str
    description: str
    resolution: int
    epochs: int
    n_folds: int
    batch_size: int
    backbones: tuple[str, ...]
    pretrained: bool = True
    holdout: float | None = None
    max_folds: int | None = None
    max_per_class: int | None = None
    early_stopping: int | None = None
    space: str | None = None  # default search space file in studies/ when --space is not given
    backbones_from_profile: bool = False  # search the profile's backbones, not the space's
    min_frozen_fraction: float | None = None  # clip a space's frozen_fraction to at least this
    workers: int = 1  # parallel trials when --workers is not given (at most one per CPU core)
    cpu_amp: bool = False  # bfloat16 autocast on CPUs with native bf16 (TrainConfig.cpu_amp)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


_OFFLINE_CPU = ("mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1")
_PAPER = ("vgg19", "mobilenetv2_100", "inception_v3", "legacy_xception", "inception_resnet_v2")

_PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "smoke",
            "Seconds per trial on CPU (tests, CI): timm test models, random init, 64 px, "
            "2 folds, 2 epochs, 40 images per class.",
            resolution=64,
            epochs=2,
            n_folds=2,
            batch_size=32,
            backbones=("test_efficientnet", "test_resnet"),
            pretrained=False,
            max_per_class=40,
        ),
        Profile(
            "demo",
            "A few minutes on 2 CPU cores: offline ImageNet weights (MobileNet v2, "
            "EfficientNet-Lite0), 128 px, 3 folds, 4 epochs, 120 images per class.",
            resolution=128,
            epochs=4,
            n_folds=3,
            batch_size=32,
            backbones=("mobilenetv2_100", "tf_efficientnet_lite0"),
            max_per_class=120,
        ),
        Profile(
            "cpu",
            "Default without CUDA: backbones whose ImageNet weights install offline, 128 px, "
            "3-fold CV, 6 epochs, and studies/cpu.yaml (deep freezing) as the default space, "
            "so frozen and pooled feature caches and pruning carry the speed; two "
            "single-thread trials side by side (on 2+ cores); bfloat16 autocast on CPUs "
            "that compute it natively (AVX512-BF16/AMX).",
            resolution=128,
            epochs=6,
            n_folds=3,
            batch_size=32,
            backbones=_OFFLINE_CPU,
            early_stopping=3,
            space="cpu.yaml",
            workers=2,
            cpu_amp=True,
        ),
        Profile(
            "gpu",
            "Default with CUDA: the curated catalogue at 224 px, 5-fold CV, 15 epochs.",
            resolution=224,
            epochs=15,
            n_folds=5,
            batch_size=64,
            backbones=(
                *_PAPER,
                "resnet50",
                "densenet121",
                "efficientnet_b0",
                "tf_efficientnet_lite0",
                "tf_efficientnet_lite2",
                "convnext_tiny",
                "regnety_016",
            ),
            early_stopping=4,
        ),
        Profile(
            "paper",
            "The paper's protocol: its five ImageNet CNNs, 10-fold CV, 224 px (299 for the "
            "Inception family, chosen per backbone), 10 epochs.",
            resolution=224,
            epochs=10,
            n_folds=10,
            batch_size=32,
            backbones=_PAPER,
            extra={"native_resolution": True},
        ),
        Profile(
            "paper-cpu",
            "The paper's protocol on a CPU: 10-fold CV and 10 epochs as in `paper`, but with "
            "the backbones whose ImageNet weights install offline (MobileNet v2, the paper's "
            "best, and EfficientNet-Lite0) in place of the space's, at 112 px, and at least "
            "75 % of the stages frozen (fine-tuning half a backbone over 10 folds x 10 epochs "
            "takes over an hour per trial on 2 cores).",
            resolution=112,
            epochs=10,
            n_folds=10,
            batch_size=32,
            backbones=("mobilenetv2_100", "tf_efficientnet_lite0"),
            backbones_from_profile=True,
            min_frozen_fraction=0.75,
        ),
    )
}


def get_profile(name: str) -> Profile:
    try:
        return _PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown profile {name!r}; allowed: {sorted(_PROFILES)}") from None


def list_profiles() -> list[Profile]:
    return list(_PROFILES.values())


def profile_workers(profile: Profile) -> int:
    """Parallel trials for `profile` on this machine: its `workers`, at most one per core."""
    return max(1, min(profile.workers, os.cpu_count() or 1))


def default_profile(cuda: bool | None = None) -> Profile:
    """gpu with CUDA, else cpu; `cuda` None asks torch (a process that must stay torch-free
    passes what a child process found, `study._coordinate.probe_device`)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return _PROFILES["gpu" if cuda else "cpu"]
