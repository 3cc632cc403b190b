"""A small U-Net lung segmenter on an ImageNet MobileNet v2 encoder, and its checkpoint file.

The checkpoint (`torch.save` of a dict) carries the architecture, the input size, the weights
and how it was trained and scored; its SHA-256 is the segmenter's identity in every cache key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from automl_cxr.errors import ConfigError, DataError
from automl_cxr.models import file_sha256

__all__ = [
    "SEGMENTER_FORMAT",
    "LungUNet",
    "Segmenter",
    "load_segmenter",
    "save_segmenter",
]

SEGMENTER_FORMAT = "automl-cxr-lungs/1"
_DECODER = (96, 64, 32, 24, 16)


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin + cskip, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class LungUNet(nn.Module):
    """(B, 1, S, S) gray in [0, 1] → (B, 1, S, S) lung logits. Encoder: a timm backbone's
    five feature levels (strides 2–32); decoder: upsample, concatenate the skip, conv-BN-ReLU."""

    @classmethod
    def for_weights(cls, encoder: str) -> LungUNet:
        """The network's shape, to load trained weights into, built without drawing from the
        global generator: a trial seeds it before its model and trains on what follows, so a
        segmenter built inside the trial (the first in a process) would change its dropout
        masks and later ones (already loaded) would not."""
        with torch.random.fork_rng(devices=[]):
            return cls(encoder)

    def __init__(self, encoder: str = "mobilenetv2_100") -> None:
        super().__init__()
        self.encoder_name = encoder
        self.encoder = timm.create_model(encoder, pretrained=False, features_only=True)
        chans = list(self.encoder.feature_info.channels())
        if len(chans) != 5:
            raise ConfigError(f"encoder {encoder!r} must give 5 feature levels, got {len(chans)}")
        cfg = self.encoder.pretrained_cfg
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        ups, cin = [], chans[-1]
        for skip, cout in zip(reversed(chans[:-1]), _DECODER[:-1], strict=True):
            ups.append(_Up(cin, skip, cout))
            cin = cout
        self.ups = nn.ModuleList(ups)
        self.out = nn.Conv2d(cin, 1, 1)

    def load_encoder_weights(self, state: dict[str, torch.Tensor]) -> None:
        """ImageNet weights of the same timm architecture (classifier keys are ignored)."""
        own = self.encoder.state_dict()
        take = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = sorted(set(own) - set(take))
        if missing:
            raise DataError(f"encoder weights lack {len(missing)} tensors, e.g. {missing[:3]}")
        self.encoder.load_state_dict(take)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = self.encoder((x - self.mean) / self.std)
        y = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            y = up(y, skip)
        return F.interpolate(self.out(y), size=size, mode="bilinear", align_corners=False)


@dataclass
class Segmenter:
    """A loaded lung segmenter: the network (eval mode), its input size, its file's SHA-256
    and what its checkpoint says about its training and held-out Dice."""

    net: LungUNet
    size: int
    sha256: str
    path: str
    info: dict[str, Any]

    @property
    def key(self) -> str:
        """What identifies it in cache keys and trial records."""
        return f"lungs:{self.sha256[:16]}"


def save_segmenter(net: LungUNet, path: str | Path, *, size: int, info: dict) -> str:
    """Write the checkpoint (atomically); returns its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    torch.save(
        {
            "format": SEGMENTER_FORMAT,
            "encoder": net.encoder_name,
            "size": int(size),
            "state_dict": state,
            "info": info,
        },
        tmp,
    )
    tmp.replace(path)
    return file_sha256(path)


_LOADED: dict[tuple[str, str], Segmenter] = {}


def load_segmenter(path: str | Path) -> Segmenter:
    """A checkpoint written by `automl-cxr lungs train` (cached per process and file hash);
    a clear DataError for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"no lung segmenter at {path}: train one with `automl-cxr lungs train` "
            "(it reads the V7 lung outlines of the Cohen images)"
        )
    sha = file_sha256(path)
    key = (str(path.resolve()), sha)
    if key in _LOADED:
        return _LOADED[key]
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path} is not a readable lung segmenter checkpoint ({exc})") from None
    if not isinstance(ck, dict) or ck.get("format") != SEGMENTER_FORMAT:
        raise DataError(f"{path} is not a lung segmenter checkpoint ({SEGMENTER_FORMAT})")
    net = LungUNet.for_weights(ck["encoder"])
    net.load_state_dict(ck["state_dict"])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    seg = Segmenter(net, int(ck["size"]), sha, str(path), dict(ck.get("info") or {}))
    _LOADED[key] = seg
    return seg
