"""Histogram equalisation and CLAHE as tensor operations, so that the exact same arithmetic
runs at search time, in `evaluate`/`predict` and inside exported TorchScript/ONNX graphs.

They reproduce OpenCV's `cv2.equalizeHist` and `cv2.createCLAHE(clipLimit=2, tileGridSize=(8,
8)).apply` on 8-bit images (the tests compare them on the shared radiographs): OpenCV is the
reference library, but a library call cannot live inside an exported graph, and a model whose
preprocessing differs between search and deployment would not be the model that was scored.
Inputs and outputs are gray levels: float tensors (B, 1, H, W) holding integers 0..255.
"""

from __future__ import annotations

import torch

from automl_cxr.lungs._modes import INTENSITY_MODES

__all__ = ["CLAHE_CLIP", "CLAHE_TILES", "INTENSITY_MODES", "clahe", "equalize", "intensity"]


CLAHE_CLIP = 2.0
CLAHE_TILES = 8


def _hist(levels: torch.Tensor, groups: int) -> torch.Tensor:
    """Histograms (B, groups, 256) of integer levels laid out (B, groups, n)."""
    b, g, _ = levels.shape
    out = torch.zeros(b, g, 256, dtype=torch.float32, device=levels.device)
    return out.scatter_add(2, levels.long(), torch.ones_like(levels, dtype=torch.float32))


def equalize(v: torch.Tensor) -> torch.Tensor:
    """Global histogram equalisation (OpenCV's `equalizeHist`)."""
    b, c, h, w = v.shape
    flat = v.reshape(b, 1, c * h * w)
    cdf = torch.cumsum(_hist(flat, 1), dim=2)  # (B, 1, 256)
    total = float(c * h * w)
    first = torch.where(cdf > 0, cdf, torch.full_like(cdf, total)).amin(dim=2, keepdim=True)
    den = (total - first).clamp(min=1.0)
    lut = torch.round((cdf - first) * (255.0 / den)).clamp(0, 255)
    out = torch.gather(lut, 2, flat.long()).reshape(b, c, h, w)
    constant = (first >= total).reshape(b, 1, 1, 1)
    return torch.where(constant, v, out)


def clahe(v: torch.Tensor, clip: float = CLAHE_CLIP, tiles: int = CLAHE_TILES) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation (OpenCV's CLAHE) on images whose sides
    are multiples of `tiles`."""
    b, c, h, w = v.shape
    th, tw = h // tiles, w // tiles
    area = th * tw
    t = v.reshape(b, tiles, th, tiles, tw).permute(0, 1, 3, 2, 4).reshape(b, tiles * tiles, area)
    hist = _hist(t, tiles * tiles)
    limit = float(max(int(clip * area / 256), 1))
    excess = (hist - limit).clamp(min=0).sum(dim=2, keepdim=True)
    hist = hist.clamp(max=limit)
    batch = torch.floor(excess / 256.0)
    hist = hist + batch
    residual = excess - batch * 256.0
    step = torch.floor(256.0 / residual.clamp(min=1.0)).clamp(min=1.0)
    idx = torch.arange(256, device=v.device, dtype=torch.float32).view(1, 1, 256)
    hist = hist + ((torch.remainder(idx, step) == 0) & (torch.floor(idx / step) < residual)).float()
    lut = torch.round(torch.cumsum(hist, dim=2) * (255.0 / area)).clamp(0, 255)
    lut = lut.reshape(b, tiles * tiles * 256)
    # bilinear interpolation between the four nearest tile centres
    ys = torch.arange(h, device=v.device, dtype=torch.float32) / th - 0.5
    xs = torch.arange(w, device=v.device, dtype=torch.float32) / tw - 0.5
    y1, x1 = torch.floor(ys), torch.floor(xs)
    ya, xa = (ys - y1).view(h, 1), (xs - x1).view(1, w)
    y2, x2 = (y1 + 1).clamp(max=tiles - 1), (x1 + 1).clamp(max=tiles - 1)
    y1, x1 = y1.clamp(min=0), x1.clamp(min=0)
    flat = v.reshape(b, h * w)

    def at(ty: torch.Tensor, tx: torch.Tensor) -> torch.Tensor:
        tile = (ty.view(h, 1) * tiles + tx.view(1, w)).reshape(1, h * w) * 256.0
        return torch.gather(lut, 1, (tile + flat).long()).reshape(b, h, w)

    top = at(y1, x1) * (1 - xa) + at(y1, x2) * xa
    bottom = at(y2, x1) * (1 - xa) + at(y2, x2) * xa
    return torch.round(top * (1 - ya) + bottom * ya).reshape(b, c, h, w)


def intensity(v: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply `mode` ("none", "equalize", "clahe") to gray levels."""
    if mode == "none":
        return v
    if mode == "equalize":
        return equalize(v)
    if mode == "clahe":
        return clahe(v)
    raise ValueError(f"intensity must be one of {INTENSITY_MODES}, but got {mode!r}")
