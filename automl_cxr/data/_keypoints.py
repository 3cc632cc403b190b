"""Step 1 of the duplicate finder (`_duplicates.py`): every image's ORB keypoints, kept as one
flat table (`LocalFeatures`) that the shortlist index and the verification read and that
`data prepare` saves beside a manifest."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from automl_cxr.data._dataset import save_npz_atomic

__all__ = [
    "N_FEATURES",
    "WORK_SIDE",
    "LocalFeatures",
    "Progress",
    "extract_features",
    "local_features",
    "work_image",
]

WORK_SIDE = 384
"""Longer side (px) of the image the keypoints are found on."""


N_FEATURES = 700
"""ORB keypoints per image (verification uses all of them)."""


Progress = Callable[[int, int], None]


@dataclass
class LocalFeatures:
    """ORB keypoints of N images, concatenated: image i owns rows offsets[i]:offsets[i+1].

    Points are in units of the image's longer side ((x, y) in [0, 1]); `sizes` is each image's
    (width, height) in the same units; rows of one image are sorted strongest first."""

    points: np.ndarray  # (M, 2) float32
    descriptors: np.ndarray  # (M, 32) uint8
    offsets: np.ndarray  # (N + 1,) int64
    sizes: np.ndarray  # (N, 2) float32

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.points[s:e], self.descriptors[s:e]

    def take(self, rows: Sequence[int] | np.ndarray) -> LocalFeatures:
        """The features of `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        parts = [self.image(int(i)) for i in rows]
        counts = np.array([len(p) for p, _ in parts], dtype=np.int64)
        return LocalFeatures(
            np.concatenate([p for p, _ in parts]) if parts else np.zeros((0, 2), np.float32),
            np.concatenate([d for _, d in parts]) if parts else np.zeros((0, 32), np.uint8),
            np.concatenate([[0], np.cumsum(counts)]),
            self.sizes[rows] if len(rows) else np.zeros((0, 2), np.float32),
        )

    @classmethod
    def stack(cls, items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> LocalFeatures:
        """From (points, descriptors, size) per image."""
        counts = np.array([len(p) for p, _, _ in items], dtype=np.int64)
        return cls(
            np.concatenate([p for p, _, _ in items]) if items else np.zeros((0, 2), np.float32),
            np.concatenate([d for _, d, _ in items]) if items else np.zeros((0, 32), np.uint8),
            np.concatenate([[0], np.cumsum(counts)]),
            np.stack([s for _, _, s in items]) if items else np.zeros((0, 2), np.float32),
        )

    def save(self, path: str | Path, keys: Sequence[str]) -> None:
        """Write to `path` (atomically), with one key per image (e.g. its sha256)."""
        save_npz_atomic(
            Path(path),
            points=self.points,
            descriptors=self.descriptors,
            offsets=self.offsets,
            sizes=self.sizes,
            keys=np.asarray(list(keys), dtype=str),
        )

    @classmethod
    def load(cls, path: str | Path, keys: Sequence[str]) -> LocalFeatures | None:
        """The features saved at `path` if they were saved for exactly `keys`, else None."""
        try:
            with np.load(path) as z:
                if z["keys"].tolist() != list(keys):
                    return None
                return cls(z["points"], z["descriptors"], z["offsets"], z["sizes"])
        except (OSError, ValueError, KeyError):
            return None


def work_image(pixels: np.ndarray) -> np.ndarray:
    """What the finder looks at: an (H, W) uint8 image resized so its longer side is
    `WORK_SIDE` px, histogram equalised (keypoints are found on it, pairs are compared on it)."""
    import cv2

    h, w = pixels.shape[:2]
    s = WORK_SIDE / max(h, w)
    img = np.ascontiguousarray(pixels, dtype=np.uint8)
    if s != 1:
        size = (max(1, round(w * s)), max(1, round(h * s)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return cv2.equalizeHist(img)


def local_features(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, descriptors, size) of one (H, W) uint8 image; see the module docstring."""
    import cv2

    img = work_image(pixels)
    orb = cv2.ORB_create(nfeatures=N_FEATURES, edgeThreshold=15, patchSize=15, fastThreshold=10)
    kps, desc = orb.detectAndCompute(img, None)
    side = float(max(img.shape))
    shape = np.array([img.shape[1] / side, img.shape[0] / side], dtype=np.float32)
    if desc is None or not kps:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), shape
    order = np.argsort([-k.response for k in kps], kind="stable")
    pts = np.array([kps[i].pt for i in order], dtype=np.float32) / side
    return pts, np.ascontiguousarray(desc[order]), shape


def extract_features(
    images: Iterable[np.ndarray], *, total: int | None = None, progress: Progress | None = None
) -> LocalFeatures:
    """`local_features` of every image (threads: OpenCV releases the GIL)."""
    items = []
    with ThreadPoolExecutor(max_workers=2) as ex:
        for i, item in enumerate(ex.map(local_features, images)):
            items.append(item)
            if progress and total:
                progress(i + 1, total)
    return LocalFeatures.stack(items)
