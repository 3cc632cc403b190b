"""X-ray-safe batch augmentation on tensors (runs on the training device, no per-image Python)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augment_batch"]


def augment_batch(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random small rotation/shift/scale and brightness/contrast on a (B, 1, H, W) [0, 1] batch.

    At strength 1: rotation ±10°, shift ±8 %, scale 0.9-1.1, brightness ±0.1, contrast
    0.8-1.2. No flips: a mirrored chest (heart on the right) is not a plausible radiograph.
    """
    if strength <= 0:
        return x
    b = x.shape[0]
    dev = x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        r = torch.rand(b, generator=generator, device="cpu")
        return (lo + (hi - lo) * r).to(dev, torch.float32)

    angle = uniform(-10.0, 10.0) * strength * math.pi / 180.0
    scale = 1.0 + uniform(-0.1, 0.1) * strength
    tx = uniform(-0.08, 0.08) * strength * 2
    ty = uniform(-0.08, 0.08) * strength * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(-0.1, 0.1).view(b, 1, 1, 1) * strength
    contrast = 1.0 + uniform(-0.2, 0.2).view(b, 1, 1, 1) * strength
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast.to(x.dtype) + mean + brightness.to(x.dtype)
    return out.clamp_(0.0, 1.0)
