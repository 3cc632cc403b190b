"""The `roi` and `intensity` levers as one tensor module, run identically everywhere.

`Preprocess` maps a radiograph resized square to `CANVAS` px (gray, float in [0, 1]) to the
model's (R x R) input: gray levels → `intensity` (none | equalize | clahe) → `roi`:
- `full`: the whole film;
- `lung_crop`: the bounding box of the two lungs (the project's segmenter, on the raw canvas)
  plus a margin of `ROI_MARGIN` of the box on each side;
- `lung_mask`: the same crop, everything outside the (slightly dilated) lungs set to 0.
The result is resized to R x R (bilinear) and quantised to 1/255, as the uint8 image cache
stores it. The resampling runs in float64 and rounds with `quantise`, so that every runtime
(PyTorch, TorchScript, ONNX Runtime) lands on the same gray level: bilinear weights of exactly
1/2 give exact ties (x.5), which float32 arithmetic in another order put on either side of
the rounding boundary; `quantise` finds them and rounds them to even, as before.

When the segmenter finds no plausible lungs (less than `MIN_AREA` or more than `MAX_AREA` of
the image, or not two-sided: one side holds under `MIN_SIDE_SHARE` of the mask), or the film
has no anatomy to segment (its gray levels' standard deviation is under `MIN_CONTRAST`: on a
featureless field the segmenter draws its positional prior, which can pass the shape checks),
the image falls back to `full` (with its intensity) and `forward_status` says so.

The same module is the search's cached preprocessing, the external sets' and `evaluate`/
`predict`'s, and the first layer of an exported model (TorchScript and ONNX).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from automl_cxr.errors import ConfigError
from automl_cxr.lungs._intensity import INTENSITY_MODES, intensity
from automl_cxr.lungs._modes import ROI_MODES
from automl_cxr.lungs._unet import LungUNet, Segmenter

__all__ = [
    "CANVAS",
    "MAX_AREA",
    "MIN_AREA",
    "MIN_CONTRAST",
    "MIN_SIDE_SHARE",
    "ROI_MARGIN",
    "ROI_MODES",
    "Preprocess",
    "PreprocessSpec",
    "Preprocessed",
    "quantise",
]


CANVAS = 256
"""Side of the square canvas every raw radiograph is resized to before the levers run."""
ROI_MARGIN = 0.08
MIN_AREA, MAX_AREA = 0.08, 0.75
MIN_SIDE_SHARE = 0.2
MIN_CONTRAST = 0.02  # std of the canvas in [0, 1]; 450 shared films: 0.07-0.32, median 0.22
_DILATE = 9  # px on the canvas: the mask keeps the lung border
_TIE = 1e-6
"""`quantise` treats values this close to x.5 as exact ties (float64 error is ~1e-13)."""


def quantise(v: torch.Tensor) -> torch.Tensor:
    """Gray levels 0..255 of float64 values `v`: round to nearest, exact ties (x.5 within
    `_TIE`) to even as `torch.round` does, but decided the same way in every runtime."""
    low = torch.floor(v)
    odd = low - 2.0 * torch.floor(low / 2.0)  # 1 where `low` is odd
    tie = (v - low - 0.5).abs() <= _TIE
    return torch.where(tie, low + odd, torch.floor(v + 0.5)).clamp(0, 255)


@dataclass(frozen=True)
class PreprocessSpec:
    """What a trial's images go through: `roi` and `intensity` (and the segmenter's hash when
    `roi` needs one). `identity` specs leave the image pipeline as it was before the levers."""

    roi: str = "full"
    intensity: str = "none"
    segmenter: str | None = None  # Segmenter.key

    def __post_init__(self) -> None:
        if self.roi not in ROI_MODES:
            raise ConfigError(f"roi must be one of {list(ROI_MODES)}, but got roi={self.roi!r}")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(
                f"intensity must be one of {list(INTENSITY_MODES)}, but got "
                f"intensity={self.intensity!r}"
            )

    @property
    def identity(self) -> bool:
        return self.roi == "full" and self.intensity == "none"

    @property
    def needs_segmenter(self) -> bool:
        return self.roi != "full"

    def key(self) -> str:
        """The cache key part: everything that changes the preprocessed pixels."""
        seg = f"_{self.segmenter}" if self.needs_segmenter else ""
        return (
            f"pp3_{self.roi}_{self.intensity}_c{CANVAS}_m{ROI_MARGIN}"
            f"_a{MIN_AREA}-{MAX_AREA}_s{MIN_SIDE_SHARE}_k{MIN_CONTRAST}{seg}"
        )


class Preprocess(nn.Module):
    """(B, 1, CANVAS, CANVAS) in [0, 1] → (B, 1, R, R) in [0, 1] (see the module doc)."""

    def __init__(
        self, spec: PreprocessSpec, resolution: int, segmenter: Segmenter | None = None
    ) -> None:
        super().__init__()
        if spec.needs_segmenter and segmenter is None:
            raise ConfigError(f"roi={spec.roi!r} needs a lung segmenter")
        self.roi = spec.roi
        self.mode = spec.intensity
        self.resolution = int(resolution)
        self.seg: LungUNet | None = segmenter.net if spec.needs_segmenter else None
        self.seg_size = segmenter.size if segmenter is not None else CANVAS

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """The segmenter's lung mask (B, 1, s, s) bool of canvases `x` (gray levels / 255): the
        only costly step, the same for every roi and intensity (cached once per image)."""
        assert self.seg is not None
        small = F.interpolate(x, size=(self.seg_size, self.seg_size), mode="area")
        return self.seg(small) > 0

    def lungs(
        self, x: torch.Tensor, small: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The lung mask on the canvas (B, 1, C, C) bool and whether it is plausible (B,);
        `small` is `segment(x)` when already known."""
        m = self.segment(x) if small is None else small  # (B, 1, s, s)
        s = self.seg_size
        area = m.float().mean(dim=(1, 2, 3))
        left = m[..., : s // 2].float().sum(dim=(1, 2, 3)) / m.float().sum(dim=(1, 2, 3)).clamp(
            min=1.0
        )
        ok = (
            (area >= MIN_AREA)
            & (area <= MAX_AREA)
            & (left >= MIN_SIDE_SHARE)
            & (left <= 1 - MIN_SIDE_SHARE)
            & (x.flatten(1).std(dim=1) >= MIN_CONTRAST)
        )
        big = F.interpolate(m.float(), size=x.shape[-2:], mode="nearest") > 0.5
        return big, ok

    def _box(self, m: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Affine theta (B, 2, 3) of the lungs' box plus margin (identity where not `ok`)."""
        n = m.shape[-1]
        pos = torch.arange(n, device=m.device, dtype=torch.float32)
        rows, cols = m.any(dim=3).squeeze(1), m.any(dim=2).squeeze(1)  # (B, n)

        def span(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lo = torch.where(a, pos, torch.full_like(pos, float(n))).amin(dim=1)
            hi = torch.where(a, pos, torch.full_like(pos, -1.0)).amax(dim=1) + 1
            margin = (hi - lo) * ROI_MARGIN
            lo = ((lo - margin) / n * 2 - 1).clamp(-1, 1)
            hi = ((hi + margin) / n * 2 - 1).clamp(-1, 1)
            return lo, hi

        y0, y1 = span(rows)
        x0, x1 = span(cols)
        one, zero = torch.ones_like(x0), torch.zeros_like(x0)
        x0, x1 = torch.where(ok, x0, -one), torch.where(ok, x1, one)
        y0, y1 = torch.where(ok, y0, -one), torch.where(ok, y1, one)
        return torch.stack(
            [
                torch.stack([(x1 - x0) / 2, zero, (x1 + x0) / 2], dim=1),
                torch.stack([zero, (y1 - y0) / 2, (y1 + y0) / 2], dim=1),
            ],
            dim=1,
        )

    def crop(
        self, x: torch.Tensor, small: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (B, 1, R, R) in [0, 1], lungs found (B,) bool — True for `full` —, the
        affine crop (B, 2, 3) sampled: model-input → canvas coordinates, both in [-1, 1];
        identity for `full` and fallbacks); `small`: `segment(x)` when already known."""
        levels = torch.round(x.clamp(0, 1) * 255.0)
        v = intensity(levels, self.mode)
        b = x.shape[0]
        if self.seg is None:
            ok = torch.ones(b, dtype=torch.bool, device=x.device)
            theta = torch.zeros(b, 2, 3, device=x.device)
            theta[:, 0, 0] = 1
            theta[:, 1, 1] = 1
        else:
            m, ok = self.lungs(levels / 255.0, small)
            if self.roi == "lung_mask":
                keep = F.max_pool2d(m.float(), _DILATE, stride=1, padding=_DILATE // 2) > 0.5
                keep = keep | ~ok.view(b, 1, 1, 1)
                v = torch.where(keep, v, torch.zeros_like(v))
            theta = self._box(m, ok)
        r = self.resolution
        grid = F.affine_grid(theta.double(), [b, 1, r, r], align_corners=False)
        out = F.grid_sample(
            v.double(), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return (quantise(out) / 255.0).to(x.dtype), ok, theta

    def forward_status(
        self, x: torch.Tensor, small: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 1, R, R) in [0, 1], lungs found (B,) bool; True for `full`)."""
        out, ok, _ = self.crop(x, small)
        return out, ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_status(x)[0]


class Preprocessed(nn.Module):
    """`model(preprocess(x))`: what an exported `roi`/`intensity` trial runs on a raw
    radiograph resized to CANVAS x CANVAS. Keeps the model's `config` and `param_counts`."""

    def __init__(self, preprocess: Preprocess, model: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.model = model
        self.config = model.config

    def param_counts(self) -> tuple[int, int]:
        counts: Callable[[], tuple[int, int]] = self.model.param_counts
        return counts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))
