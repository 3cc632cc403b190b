"""The same radiograph under any framing, and the same patient across sources.

A copy of a film that a paper or a collection republished is cropped, padded, resized,
re-windowed and re-encoded, so neither its bytes nor a whole-image thumbnail match the
original. The finder works on local features instead:

1. **Features.** Every image, resized so its longer side is `WORK_SIDE` px and histogram
   equalised, gets up to `N_FEATURES` OpenCV ORB keypoints (binary descriptors that compare
   pixel pairs, hence blind to gamma and windowing).
2. **Shortlist** (`_shortlist.py`). The strongest descriptors of every image go into a faiss
   binary inverted-file index; each descriptor of a query image votes for the image that owns
   its nearest neighbour, and the images with most votes are the candidates. A query costs the
   same at any number of images, so the finder grows linearly, not quadratically.
3. **Verification.** Candidate pairs are matched (Lowe's ratio test and a mutual check) and an
   affine transform is fitted with RANSAC; a transform that no re-framing produces (rotation over
   `MAX_ROTATION` degrees, scale outside 1/`MAX_SCALE`..`MAX_SCALE`, anisotropy over
   `MAX_ANISOTROPY`, shear over `MAX_SHEAR`) counts as no match.
4. **Aligned texture** (`_aligned.py`, when the images' files are given). A shortlisted pair
   that fails step 3 (too few inliers, or inliers bunched in a corner) but still has a
   plausible transform with `RESCUE_INLIERS` inliers is looked at pixel by pixel: the second
   image is warped onto the first by that transform, both are band-passed and correlated cell
   by cell (`aligned_correlation`); a re-framed copy keeps the original's fine texture, two
   patients' films lined up by their anatomy or a burned-in label do not.

A pair with at least `COPY_INLIERS` inliers is a **copy** (the same radiograph); one with
`MATCH_INLIERS` to `COPY_INLIERS` - 1, or found by step 4, is a **same-patient** match (a
follow-up film of the same patient, or a heavily cropped copy: either way one patient). The
thresholds come from the measured distributions in `benchmarks/DUPLICATES.md`
(`benchmarks/duplicates.py`, `benchmarks/duplicate_aligned.py`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from automl_cxr.data._aligned import (
    ALIGNED_CORRELATION,
    RESCUE_INLIERS,
    aligned_correlation,
    image_reader,
)
from automl_cxr.data._keypoints import LocalFeatures, Progress
from automl_cxr.data._shortlist import shortlist

__all__ = [
    "COPY_INLIERS",
    "FEATURES_FILE",
    "MATCH_INLIERS",
    "Match",
    "UnionFind",
    "find_matches",
    "inlier_matches",
    "mutual_matches",
    "ransac_iterations",
    "verify_pair",
]

FEATURES_FILE = "duplicates.npz"
"""A prepared dataset's keypoints (row-aligned with its manifest, keyed by each row's sha256)."""

RATIO = 0.8
"""Lowe's ratio test on the two nearest descriptors."""
RANSAC_THRESHOLD = 0.004
"""RANSAC reprojection threshold, as a fraction of the longer side (1.5 px at `WORK_SIDE`): a
copy's keypoints land where the transform puts them; the anatomy of two patients only roughly."""
RANSAC_CONFIDENCE = 0.995
RANSAC_MAX_ITERS = 2000
"""RANSAC finds a model with `MATCH_INLIERS` inliers with this probability, in at most this
many iterations (`ransac_iterations`)."""
GRID = 4
MIN_CELLS = 6
"""Inliers must fall in at least `MIN_CELLS` cells of a `GRID` x `GRID` grid over either image:
a burned-in label or a scanner's frame, the same in many films of one hospital, is not enough."""
MAX_ROTATION = 15.0
MAX_SCALE = 6.0
MAX_ANISOTROPY = 1.5
MAX_SHEAR = 0.15

MATCH_INLIERS = 30
"""Inliers (spread over `MIN_CELLS` cells) from which two films are one patient. Measured on the
shared films: pairs of different patients the shortlist proposes reach 20-26 (Kermany children's
films), re-framed copies' 2nd percentile is about 30 (benchmarks/DUPLICATES.md)."""
COPY_INLIERS = 80
"""Inliers from which two films are one radiograph (measured: follow-up films of one patient at
most 70)."""


class UnionFind:
    """Union-find over names (image indices, patient ids); a set's representative is its
    smallest name."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.parent = {p: p for p in items}

    def find(self, p: Any) -> Any:
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def join(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(frozen=True)
class Match:
    """Image `a` (of the query set) and image `b` (of the base set, or the query set itself)."""

    a: int
    b: int
    kind: str  # "copy" | "same_patient"
    inliers: int
    votes: int
    transform: dict[str, float]  # scale_x, scale_y, rotation (degrees), tx, ty (of a → b)
    correlation: float | None = None  # aligned texture (step 4), when that found the pair

    def evidence(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kind": self.kind,
            "inliers": self.inliers,
            "votes": self.votes,
            "transform": self.transform,
        }
        if self.correlation is not None:
            out["correlation"] = self.correlation
        return out


def _transform(m: np.ndarray) -> dict[str, float] | None:
    """The affine `m` (2x3) as scales, rotation and shift, or None when no re-framing makes it."""
    a = m[:, :2]
    sx, sy = float(np.hypot(a[0, 0], a[1, 0])), float(np.hypot(a[0, 1], a[1, 1]))
    if np.linalg.det(a) <= 0 or min(sx, sy) <= 0:
        return None
    rot = float(np.degrees(np.arctan2(a[1, 0], a[0, 0])))
    shear = abs(float(a[:, 0] @ a[:, 1])) / (sx * sy)
    if (
        abs(rot) > MAX_ROTATION
        or not (1 / MAX_SCALE < sx < MAX_SCALE and 1 / MAX_SCALE < sy < MAX_SCALE)
        or max(sx / sy, sy / sx) > MAX_ANISOTROPY
        or shear > MAX_SHEAR
    ):
        return None
    return {
        "scale_x": round(sx, 4),
        "scale_y": round(sy, 4),
        "rotation": round(rot, 2),
        "tx": round(float(m[0, 2]), 4),
        "ty": round(float(m[1, 2]), 4),
    }


def mutual_matches(da: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into `da`, into `db`) of descriptor pairs that are each other's nearest
    neighbour (Hamming) and pass Lowe's ratio test (`RATIO`): a faiss brute-force binary
    search each way (what OpenCV's BFMatcher computes, about twice as fast here)."""
    import faiss

    da, db = np.ascontiguousarray(da, np.uint8), np.ascontiguousarray(db, np.uint8)
    if len(db) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bits = da.shape[1] * 8
    ib = faiss.IndexBinaryFlat(bits)
    ib.add(db)
    dist, near = ib.search(da, 2)
    ia = faiss.IndexBinaryFlat(bits)
    ia.add(da)
    _, back = ia.search(db, 1)
    q = np.arange(len(da))
    keep = (dist[:, 0] < RATIO * dist[:, 1]) & (back[near[:, 0], 0] == q)
    return q[keep], near[keep, 0].astype(np.int64)


def ransac_iterations(n_matches: int, min_inliers: int) -> int:
    """RANSAC iterations that find a model with at least `min_inliers` of `n_matches`
    candidate matches with probability `RANSAC_CONFIDENCE`: an affine model is fitted to 3
    matches, all inliers with probability at least (min_inliers / n)^3 per draw. A model with
    fewer inliers cannot pass, so iterating beyond this only serves pairs that fail anyway
    (at most `RANSAC_MAX_ITERS`; 0 when n < min_inliers)."""
    if n_matches < max(min_inliers, 3):
        return 0
    p = (min_inliers / n_matches) ** 3
    if p >= 1.0:
        return 1
    need = math.log(1.0 - RANSAC_CONFIDENCE) / math.log(1.0 - p)
    return int(min(RANSAC_MAX_ITERS, max(1, math.ceil(need))))


def inlier_matches(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    *,
    min_inliers: int = 4,
) -> tuple[np.ndarray, np.ndarray, dict[str, float] | None]:
    """(points of a, points of b, transform) of the RANSAC inliers of two images' (points,
    descriptors); empty arrays and None when no plausible re-framing maps one onto the other.
    Only a model with at least `min_inliers` inliers is looked for (`ransac_iterations`):
    the finder asks for `MATCH_INLIERS`, a pair with fewer candidate matches is not fitted."""
    fit = _fit(a, b, min_inliers)
    if fit is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), None
    return fit[0], fit[1], fit[3]


def _fit(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    min_inliers: int,
    matches: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]] | None:
    """(inlier points of a, of b, the 2x3 affine a → b, its `_transform` with `cells`) or
    None (see `inlier_matches`); `matches`: the pair's `mutual_matches`, when already found."""
    import cv2

    (pa, da), (pb, db) = a, b
    if len(da) < 4 or len(db) < 4:
        return None
    q, t = mutual_matches(da, db) if matches is None else matches
    iters = ransac_iterations(len(q), max(4, min_inliers))
    if iters == 0:
        return None
    m, inl = cv2.estimateAffine2D(
        pa[q],
        pb[t],
        method=cv2.RANSAC,
        ransacReprojThreshold=RANSAC_THRESHOLD,
        maxIters=iters,
        confidence=RANSAC_CONFIDENCE,
    )
    if m is None or inl is None:
        return None
    tr = _transform(m)
    if tr is None:
        return None
    keep = inl.ravel() > 0
    tr["cells"] = max(_cells(pa[q][keep], pa), _cells(pb[t][keep], pb))
    return pa[q][keep], pb[t][keep], m, tr


def _passes(fit: tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]] | None) -> bool:
    """Whether a `_fit` is a keypoint match (step 3): `MATCH_INLIERS` inliers over `MIN_CELLS`
    cells."""
    return fit is not None and len(fit[0]) >= MATCH_INLIERS and fit[3]["cells"] >= MIN_CELLS


def _cells(points: np.ndarray, frame: np.ndarray) -> int:
    """Cells of a `GRID` x `GRID` grid over the image (bounded by its keypoints `frame`) that
    hold at least one of `points`. Counted in both images, the larger is kept: a cropped copy
    covers all of its own frame but only part of the original's."""
    size = np.maximum(frame.max(axis=0), 1e-6)
    cells = np.floor(points / size * GRID).clip(0, GRID - 1).astype(np.int64)
    return int(len(np.unique(cells[:, 0] * GRID + cells[:, 1])))


def verify_pair(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    *,
    min_inliers: int = 4,
) -> tuple[int, dict[str, float] | None]:
    """(RANSAC inliers, transform) of the geometric match of two images (`inlier_matches`)."""
    pa, _, tr = inlier_matches(a, b, min_inliers=min_inliers)
    return (len(pa), tr) if tr is not None else (0, None)


def find_matches(
    query: LocalFeatures,
    base: LocalFeatures | None = None,
    *,
    paths: Sequence[str | Path] | None = None,
    base_paths: Sequence[str | Path] | None = None,
    progress: Progress | None = None,
    skip_merged: bool = False,
    timings: dict[str, float] | None = None,
) -> list[Match]:
    """Every verified pair (query image, base image): at least `MATCH_INLIERS` inliers over
    `MIN_CELLS` cells, or, when the images' files are given (`paths` of the query images and,
    with `base`, `base_paths`), a failed pair the aligned texture confirms (step 4).

    With `base=None`, pairs within `query` (a < b, each pair once). Sorted by (a, b).
    `skip_merged` (pairs within `query` only): a candidate pair whose images are already
    joined by copies found before it is not verified. What is one radiograph (the copies'
    connected sets) stays the same; only copy pairs implied by others go unlisted, which is
    what `data prepare` needs (it merges each set into one image) and saves most of the
    verification on collections that hold many copies of one film. `timings`, when given,
    receives the wall seconds of the shortlist and of the verification and the number of
    candidate pairs verified and skipped."""
    same = base is None
    if skip_merged and not same:
        raise ValueError("skip_merged applies to pairs within one set (base=None)")
    base = query if base is None else base
    read_a = image_reader(paths) if paths is not None else None
    read_b = read_a if same else (image_reader(base_paths) if base_paths is not None else None)
    t0 = time.perf_counter()
    todo = shortlist(query, None if same else base)
    t1 = time.perf_counter()
    copies = UnionFind(range(len(query)) if skip_merged else ())
    out, unread, skipped = [], 0, 0
    for done, ((a, b), n) in enumerate(sorted(todo.items()), start=1):
        if skip_merged and copies.find(a) == copies.find(b):
            skipped += 1
            if progress:
                progress(done, len(todo))
            continue
        fa, fb = query.image(a), base.image(b)
        # the descriptor matches are found once: step 4 refits the same ones
        mm = mutual_matches(fa[1], fb[1]) if min(len(fa[1]), len(fb[1])) >= 4 else None
        strict = _fit(fa, fb, MATCH_INLIERS, mm)
        if _passes(strict):
            inliers = len(strict[0])
            kind = "copy" if inliers >= COPY_INLIERS else "same_patient"
            out.append(Match(a, b, kind, inliers, n, strict[3]))
            if skip_merged and kind == "copy":
                copies.join(a, b)
        elif read_a is not None and read_b is not None:
            fit = _fit(fa, fb, RESCUE_INLIERS, mm)
            if fit is not None and len(fit[0]) >= RESCUE_INLIERS:
                ia, ib = read_a(a), read_b(b)
                unread += ia is None or ib is None
                c = None if ia is None or ib is None else aligned_correlation(ia, ib, fit[2])
                if c is not None and c >= ALIGNED_CORRELATION:
                    out.append(Match(a, b, "same_patient", len(fit[0]), n, fit[3], round(c, 4)))
        if progress:
            progress(done, len(todo))
    if unread:
        warnings.warn(
            f"{unread} candidate pair(s) could not be compared by aligned texture: an image "
            "file is no longer readable (moved or deleted since its keypoints were taken); "
            "those pairs were judged by keypoints only",
            RuntimeWarning,
            stacklevel=2,
        )
    if timings is not None:
        timings.update(
            shortlist_s=round(t1 - t0, 2),
            verify_s=round(time.perf_counter() - t1, 2),
            pairs_verified=len(todo) - skipped,
            pairs_skipped=skipped,
        )
    return out


# ----------------------------------------------------------------------------- reuse
# Preparing the same pool again (another recipe, another seed, a test run) costs nothing: the
# keypoints of an image are kept by its sha256, the pairs of a pool by the sha256 of all its
# images, both under the finder's version (its parameters), in the user's cache folder.
