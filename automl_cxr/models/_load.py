"""A backbone with its weights: the timm model built headless, the resolved checkpoint
converted and loaded strictly (timm's own checkpoint filter as a fallback), built once per
process and file and handed out as independent copies."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from automl_cxr._compat.timm import checkpoint_filter
from automl_cxr._compat.torch import clone_module
from automl_cxr.errors import WeightsUnavailable
from automl_cxr.models._catalogue import BackboneSpec
from automl_cxr.models._convert import convert_state_dict, read_state_dict
from automl_cxr.models._weights import (
    WeightSource,
    file_key,
    file_sha256,
    file_sha256_once,
    hf_cached,
    pretrained_cfg,
)

__all__ = ["load_backbone"]


def _names(value: str | tuple | list | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _load_into(
    model: nn.Module, sd: dict, spec: BackboneSpec, path: str, fmt: str, skip: tuple[str, ...]
) -> None:
    """Strictly load `sd` into the headless `model` (classifier and `skip` modules aside)."""
    cfg = pretrained_cfg(spec.name)
    drop = _names(getattr(cfg, "classifier", None)) + tuple(skip)
    sd = {k: v for k, v in sd.items() if not any(k == d or k.startswith(d + ".") for d in drop)}
    in_chans = int(getattr(model, "in_chans", 3) or 3)
    for conv in _names(getattr(cfg, "first_conv", None)):
        key = conv + ".weight"
        if key in sd and in_chans != sd[key].shape[1] and sd[key].ndim == 4:
            sd[key] = adapt_input_conv(in_chans, sd[key])  # 1 channel: summed RGB kernels
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches are errors even when not strict
        detail = str(exc).split("\n\t", 1)[-1].split("\n")[0]
        raise WeightsUnavailable(
            f"weights file {path} ({fmt} layout) does not fit backbone {spec.name!r}: {detail}"
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:4])}")
        if result.unexpected_keys:
            bad = result.unexpected_keys
            parts.append(f"unexpected {len(bad)} key(s) e.g. {', '.join(bad[:4])}")
        raise WeightsUnavailable(
            f"weights file {path} ({fmt} layout) does not fit backbone {spec.name!r}: "
            + "; ".join(parts)
        )


def load_backbone(
    spec: BackboneSpec,
    source: WeightSource,
    *,
    in_chans: int = 3,
    skip: tuple[str, ...] = (),
    prepare: Callable[[nn.Module], None] | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, WeightSource]:
    """A headless timm backbone (`num_classes=0`) with the weights of `source` loaded.

    `prepare(model)` (if given) runs before the weights load, e.g. to drop modules the
    builder never uses (their names in `skip` are ignored in the checkpoint).
    """
    if source.kind == "download":
        try:
            model = timm.create_model(spec.name, pretrained=True, in_chans=in_chans, **model_kwargs)
        except Exception as exc:
            raise WeightsUnavailable(
                f"downloading weights for backbone {spec.name!r} failed: {exc}"
            ) from None
        model.reset_classifier(0)
        if prepare is not None:
            prepare(model)
        path = hf_cached(spec.name)
        sha = file_sha256(path) if path else None
        return model, replace(source, path=path, sha256=sha)

    if source.path is None:
        raise WeightsUnavailable(f"weight source {source} of backbone {spec.name!r} has no file")
    key = (
        spec.name,
        source,
        file_key(source.path),
        in_chans,
        tuple(sorted(model_kwargs.items())),
        skip,
    )
    cached = _TEMPLATES.get(key)
    if cached is None:
        # Built once per process and file, outside the caller's random stream: the random
        # init timm runs before the weights load is overwritten anyway, and a trial's seeded
        # head init must not depend on whether this process had built the backbone before.
        with torch.random.fork_rng(devices=[]):
            cached = _load_file_backbone(spec, source, in_chans, skip, prepare, model_kwargs)
        while len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.pop(next(iter(_TEMPLATES)))
        _TEMPLATES[key] = cached
    model, source = cached
    return clone_module(model), source  # ~3x faster than building and loading again


_TEMPLATES: dict[tuple, tuple[nn.Module, WeightSource]] = {}


_MAX_TEMPLATES = 4
"""Backbones loaded from weight files in this process (never trained: callers get copies)."""


def _load_file_backbone(
    spec: BackboneSpec,
    source: WeightSource,
    in_chans: int,
    skip: tuple[str, ...],
    prepare: Callable[[nn.Module], None] | None,
    model_kwargs: dict[str, Any],
) -> tuple[nn.Module, WeightSource]:
    sd, fmt = _converted_state_dict(source.path, spec.arch)
    model = timm.create_model(
        spec.name, pretrained=False, num_classes=0, in_chans=in_chans, **model_kwargs
    )
    if prepare is not None:
        prepare(model)
    try:
        _load_into(model, sd, spec, source.path, fmt, skip)
    except WeightsUnavailable:
        # timm-layout files of some architectures need timm's own checkpoint filter
        filt = checkpoint_filter(model)
        if fmt != "timm" or filt is None:
            raise
        _load_into(model, filt(sd, model), spec, source.path, fmt, skip)
    if source.sha256 is None:
        source = replace(source, sha256=file_sha256_once(source.path))
    return model, replace(source, format=fmt if fmt != "timm" else source.format or fmt)


@functools.lru_cache(maxsize=16)
def _converted_cached(key: tuple[str, int, int], arch: str) -> tuple[dict, str]:
    return convert_state_dict(read_state_dict(key[0]), arch)


def _converted_state_dict(path: str | os.PathLike, arch: str) -> tuple[dict, str]:
    """`convert_state_dict(read_state_dict(path), arch)`, read once per process and file
    version (a search builds the same backbone for every trial); a fresh dict each call, since
    loading replaces entries (e.g. a gray stem's summed kernels)."""
    sd, fmt = _converted_cached(file_key(path), arch)
    return dict(sd), fmt
