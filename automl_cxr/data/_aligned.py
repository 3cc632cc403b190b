"""Step 4 of the duplicate finder (`_duplicates.py`): a shortlisted pair that keypoint
verification rejects is compared pixel by pixel once the two images are lined up by the
transform the keypoints still agree on. A re-framed copy keeps the original's fine texture
(vessels, rib edges, film grain); two patients' films lined up by their anatomy or by a
burned-in label agree in a few cells of the image at most, so the median over cells tells them
apart. Thresholds: `benchmarks/DUPLICATES.md` (`benchmarks/duplicate_aligned.py`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from automl_cxr.data._keypoints import work_image

__all__ = [
    "ALIGNED_CORRELATION",
    "ALIGNED_GRID",
    "ALIGNED_SIGMAS",
    "RESCUE_INLIERS",
    "align",
    "aligned_correlation",
    "image_reader",
]

RESCUE_INLIERS = 12
"""Inliers (of a plausible transform) a shortlisted pair that fails the keypoint rule needs to
be compared pixel by pixel (step 4; the re-framed copies that failed it had 12-47, measured)."""
ALIGNED_GRID = 8
ALIGNED_SIGMAS = (1.0, 4.0)
"""Step 4 correlates the difference of two Gaussian blurs (sigmas in px at `WORK_SIDE`) of the
two aligned images in each cell of an `ALIGNED_GRID` x `ALIGNED_GRID` grid (cells at least
80 % inside both images and not flat; at least `ALIGNED_GRID` of them, else no verdict)."""
ALIGNED_CORRELATION = 0.45
"""Median cell correlation from which a pair step 4 looks at is one patient (measured on the
benchmark's shortlisted pairs that fail step 3: re-framed copies 0.53-0.90, films of two
patients at most 0.37; with a second set of copies 0.71-0.93 and 0.37; benchmarks/DUPLICATES.md)."""


def align(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`b` warped onto `a`'s frame by `m` (the 2x3 affine from a's to b's points, in units of
    each image's longer side) as float32, edges replicated; and where a's pixels see b (4 px in
    from b's edges, so a blur of the warped image near them reads b, not the edge)."""
    import cv2

    sa, sb = float(max(a.shape)), float(max(b.shape))
    mp = np.hstack([m[:, :2] * (sb / sa), m[:, 2:] * sb]).astype(np.float64)
    h, w = a.shape
    flags = cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(
        b.astype(np.float32),
        mp,
        (w, h),
        flags=cv2.INTER_LINEAR | flags,
        borderMode=cv2.BORDER_REPLICATE,
    )
    inside = cv2.warpAffine(
        np.ones(b.shape, np.uint8), mp, (w, h), flags=cv2.INTER_NEAREST | flags, borderValue=0
    )
    return warped, cv2.erode(inside, np.ones((9, 9), np.uint8)) > 0


def aligned_correlation(
    a: np.ndarray, b: np.ndarray, m: np.ndarray, *, sigmas: tuple[float, float] = ALIGNED_SIGMAS
) -> float | None:
    """Median, over the cells of a grid on `a`, of the correlation of `a` and `b` warped onto it
    by `m` (the 2x3 affine from a's to b's points, in units of each image's longer side), both
    band-passed (`sigmas`); None when fewer than `ALIGNED_GRID` cells can be compared.
    `a` and `b` are `work_image`s."""
    import cv2

    h, w = a.shape
    warped, inside = align(a, b, m)
    lo, hi = sigmas

    def band(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (0, 0), lo) - cv2.GaussianBlur(x, (0, 0), hi)

    fa, fb = band(a.astype(np.float32)), band(warped)
    g = ALIGNED_GRID
    values = []
    for i in range(g):
        for j in range(g):
            cell = (slice(i * h // g, (i + 1) * h // g), slice(j * w // g, (j + 1) * w // g))
            ok = inside[cell]
            if ok.mean() < 0.8:
                continue
            x, y = fa[cell][ok].astype(np.float64), fb[cell][ok].astype(np.float64)
            x, y = x - x.mean(), y - y.mean()
            den = math.sqrt(float(x @ x) * float(y @ y))
            if den < 1e-6 * len(x):
                continue  # a flat cell (padding, a burned-out corner) says nothing
            values.append(float(x @ y) / den)
    return float(np.median(values)) if len(values) >= g else None


def image_reader(paths: Sequence[str | Path]) -> Callable[[int], np.ndarray | None]:
    """The `work_image` of paths[i], decoded on first use (a few hundred kept); None when the
    file cannot be read any more (moved since its keypoints were taken)."""
    from automl_cxr.data._image import decode_gray
    from automl_cxr.errors import DataError

    @lru_cache(maxsize=256)
    def read(i: int) -> np.ndarray | None:
        try:
            return work_image(decode_gray(paths[i], min_side=1).pixels)
        except DataError:
            return None

    return read
