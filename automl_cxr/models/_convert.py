"""Checkpoints onto timm models: reading a state dict from any supported file, and renaming
torchvision (MobileNetV2, old DenseNet) and lukemelas EfficientNet-PyTorch keys to timm's."""

from __future__ import annotations

import functools
import os
import re

import timm
import torch
from timm.models import load_state_dict
from torch import nn

from automl_cxr.errors import WeightsUnavailable

__all__ = ["convert_state_dict", "read_state_dict"]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict (safetensors or torch; `state_dict`/`model`/EMA unwrapped)."""
    try:
        sd = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(f"cannot read weights file {path}: {exc}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailable(f"weights file {path} does not hold a state dict of tensors")
    return sd


@functools.lru_cache(maxsize=64)
def _block_names(arch: str) -> tuple[str, ...]:
    """EfficientNet-family block names (`blocks.i.j`) in forward order; () for other models."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return ()
    return tuple(
        f"blocks.{i}.{j}"
        for i, stage in enumerate(blocks)
        if isinstance(stage, nn.Sequential)
        for j in range(len(stage))
    )


def _rename(key: str, table: dict[str, str]) -> str | None:
    for src in sorted(table, key=len, reverse=True):
        if key == src or key.startswith(src + "."):
            return table[src] + key[len(src) :]
    return None


def _convert_torchvision_mobilenetv2(sd: dict, blocks: tuple[str, ...]) -> dict:
    """torchvision MobileNetV2 → timm: features.0 → stem, features.k → (k−1)-th block,
    the last features.N → conv_head/bn2, classifier.1 → classifier."""
    last = len(blocks) + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        new: str | None = None
        if key.startswith("classifier.1."):
            new = "classifier." + key[len("classifier.1.") :]
        elif m and int(m[1]) == 0:
            new = _rename(m[2], {"0": "conv_stem", "1": "bn1"})
        elif m and int(m[1]) == last:
            new = _rename(m[2], {"0": "conv_head", "1": "bn2"})
        elif m and 1 <= int(m[1]) < last:
            i = int(m[1])
            if f"features.{i}.conv.3.weight" in sd:  # expand → depthwise → project
                table = {
                    "conv.0.0": "conv_pw",
                    "conv.0.1": "bn1",
                    "conv.1.0": "conv_dw",
                    "conv.1.1": "bn2",
                    "conv.2": "conv_pwl",
                    "conv.3": "bn3",
                }
            else:  # no expansion: depthwise → project
                table = {
                    "conv.0.0": "conv_dw",
                    "conv.0.1": "bn1",
                    "conv.1": "conv_pw",
                    "conv.2": "bn2",
                }
            sub = _rename(m[2], table)
            new = f"{blocks[i - 1]}.{sub}" if sub else None
        out[new or key] = value
    return out


def _convert_lukemelas(sd: dict, blocks: tuple[str, ...]) -> dict:
    """lukemelas EfficientNet-PyTorch → timm EfficientNet (block i → i-th timm block)."""
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    se = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
    expand = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
        **se,
    }
    plain = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
        **se,
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(.+)", key)
        new: str | None
        if m:
            i = int(m[1])
            table = expand if f"_blocks.{i}._expand_conv.weight" in sd else plain
            sub = _rename(m[2], table)
            new = f"{blocks[i]}.{sub}" if sub and i < len(blocks) else None
        else:
            new = _rename(key, top)
        out[new or key] = value
    return out


_TV_DENSENET = re.compile(  # old torchvision DenseNet keys: "norm.1.weight" → "norm1.weight"
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\."
    r"(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def convert_state_dict(sd: dict, arch: str) -> tuple[dict, str]:
    """Convert a torchvision / lukemelas checkpoint onto timm's keys; returns (sd, format)."""
    if "_conv_stem.weight" in sd and _block_names(arch):
        return _convert_lukemelas(sd, _block_names(arch)), "lukemelas"
    if "features.0.0.weight" in sd and "features.1.conv.0.0.weight" in sd and _block_names(arch):
        return _convert_torchvision_mobilenetv2(sd, _block_names(arch)), "torchvision"
    if any(_TV_DENSENET.match(k) for k in sd):  # old torchvision DenseNet files ("norm.1")
        return {_TV_DENSENET.sub(r"\1\2", k): v for k, v in sd.items()}, "torchvision"
    if any(k.startswith("AuxLogits.") for k in sd):  # torchvision Inception v3
        return {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}, "torchvision"
    if "classifier.6.weight" in sd and "features.0.weight" in sd:  # torchvision VGG
        return {k: v for k, v in sd.items() if not k.startswith("classifier.")}, "torchvision"
    return sd, "timm"
