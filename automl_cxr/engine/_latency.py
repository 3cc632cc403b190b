"""Inference latency of a trial's model, per image: the backbone and the head are timed
separately and once per process (a head design shares its backbone's time)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import torch

from automl_cxr.models import CxrModel, ModelConfig

__all__ = ["latency_once"]

_LATENCY: dict[str, float] = {}
_PROBE: dict[str, torch.Tensor] = {}  # per backbone key: one image's feature map

_NO_LATENCY_EFFECT = frozenset({"dropout"})
"""Head options that change training but not the cost of a forward pass."""


def latency_once(
    model: CxrModel,
    mc: ModelConfig,
    resolution: int,
    device: torch.device,
    autocast,
    precision: str,
) -> float:
    """Single-image inference latency (ms) of `model`: its backbone's `forward_features`
    plus its head, each timed once per process for its architecture, resolution, device,
    precision and thread count and summed. Frozen depth, weights and dropout do not change
    it, so a search times each backbone once and each head shape once (on the backbone's
    feature map, well under a millisecond) instead of seven full forward passes per trial."""
    common = [resolution, str(device), precision, torch.get_num_threads()]
    head_kwargs = {k: v for k, v in mc.head_kwargs.items() if k not in _NO_LATENCY_EFFECT}
    keys = [
        json.dumps(parts, sort_keys=True, default=str)
        for parts in (
            [mc.backbone, mc.gray_mode, *common],
            [mc.backbone, mc.head, head_kwargs, *common],
        )
    ]
    if any(k not in _LATENCY for k in keys):
        model.eval()
        if keys[0] not in _LATENCY or keys[0] not in _PROBE:
            x = torch.rand(1, 1, resolution, resolution, device=device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast():
                _PROBE[keys[0]] = model.forward_features(x)  # a feature map for head timing
            _LATENCY[keys[0]] = _latency_ms(model.forward_features, x, device, autocast)
        if keys[1] not in _LATENCY:
            head = lambda f: model.head(model.neck(f))  # noqa: E731
            _LATENCY[keys[1]] = _latency_ms(head, _PROBE[keys[0]], device, autocast)
    return _LATENCY[keys[0]] + _LATENCY[keys[1]]


def _latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device, autocast):
    """Median wall time (ms) of `fn(x)` over 5 calls after 2 warm-up calls."""
    times = []
    with torch.inference_mode(), autocast():
        for i in range(7):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)
