"""The duplicate finder's on-disk cache: keypoints per image (by its sha256) and the pairs
found in a set (by the digest of its members), both keyed by the finder's version and
thresholds, so a second `data prepare` or search re-uses them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from automl_cxr.data._aligned import (
    ALIGNED_CORRELATION,
    ALIGNED_GRID,
    ALIGNED_SIGMAS,
    RESCUE_INLIERS,
)
from automl_cxr.data._dataset import save_npz_atomic
from automl_cxr.data._duplicates import (
    COPY_INLIERS,
    GRID,
    MATCH_INLIERS,
    MAX_ANISOTROPY,
    MAX_ROTATION,
    MAX_SCALE,
    MAX_SHEAR,
    MIN_CELLS,
    RANSAC_CONFIDENCE,
    RANSAC_MAX_ITERS,
    RANSAC_THRESHOLD,
    RATIO,
    Match,
    find_matches,
)
from automl_cxr.data._image import decode_gray
from automl_cxr.data._keypoints import (
    N_FEATURES,
    WORK_SIDE,
    LocalFeatures,
    Progress,
    local_features,
)
from automl_cxr.data._shortlist import (
    COARSE_PROBE,
    INDEX_FEATURES,
    LIST_CODES,
    MIN_VOTES,
    PROBE,
    SHORTLIST,
    VOTE_DISTANCE,
)

__all__ = ["cache_dir", "features_for", "features_of_files", "find_matches_keyed"]

_PARAMS = (
    WORK_SIDE,
    N_FEATURES,
    INDEX_FEATURES,
    VOTE_DISTANCE,
    SHORTLIST,
    MIN_VOTES,
    LIST_CODES,
    PROBE,
    COARSE_PROBE,
    RATIO,
    RANSAC_THRESHOLD,
    GRID,
    MIN_CELLS,
    MAX_ROTATION,
    MAX_SCALE,
    MAX_ANISOTROPY,
    MAX_SHEAR,
    MATCH_INLIERS,
    COPY_INLIERS,
    RANSAC_CONFIDENCE,
    RANSAC_MAX_ITERS,
    RESCUE_INLIERS,
    ALIGNED_GRID,
    ALIGNED_SIGMAS,
    ALIGNED_CORRELATION,
    5,  # the pairs' format and the rules (3: RANSAC bounded; 4: the aligned-texture step;
    # 5: the shortlist's index with a constant cost per query)
)


def _version() -> str:
    return hashlib.sha256(repr(_PARAMS).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """`$AUTOML_CXR_CACHE`, else `~/.cache/automl-cxr` (`$XDG_CACHE_HOME` honoured)."""
    if os.environ.get("AUTOML_CXR_CACHE"):
        return Path(os.environ["AUTOML_CXR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "automl-cxr"


def features_for(pixels: np.ndarray, sha256: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`local_features` of an image whose bytes hash to `sha256`, kept in the cache folder."""
    path = cache_dir() / f"keypoints-{_version()}" / sha256[:2] / f"{sha256}.npz"
    with contextlib.suppress(OSError, ValueError, KeyError), np.load(path) as z:
        return z["points"], z["descriptors"], z["size"]
    pts, desc, size = local_features(pixels)
    with contextlib.suppress(OSError):  # an unwritable cache only costs time
        save_npz_atomic(path, points=pts, descriptors=desc, size=size)
    return pts, desc, size


def find_matches_keyed(
    features: LocalFeatures,
    keys: Sequence[str],
    *,
    paths: Sequence[str | Path] | None = None,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> list[Match]:
    """`find_matches(features, paths=paths, skip_merged=True)` (pairs within one set, for
    merging copies), kept in the cache folder under the sha256 of the set's `keys` (one
    distinct key per image, e.g. its sha256; the files at `paths` must have those contents).
    A pair read back keeps the direction it was verified in, so its transform maps `a` onto
    `b`. `timings` as `find_matches`'s, or `{"pairs_cached": 1}` when read back."""
    keys = [str(k) for k in keys]
    run = {"paths": paths, "progress": progress, "skip_merged": True, "timings": timings}
    if len(set(keys)) != len(keys):
        return find_matches(features, **run)
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    rule = "" if paths is not None else "-keypoints-only"
    # "-merging": pairs implied by copies found before them were not verified (skip_merged)
    path = cache_dir() / f"pairs-{_version()}" / f"{digest}{rule}-merging.json"
    index = {k: i for i, k in enumerate(keys)}
    with contextlib.suppress(OSError, ValueError, KeyError):
        out = []
        for r in json.loads(path.read_text()):
            # a and b as found: `transform` maps a onto b (in another row order a may be > b)
            out.append(
                Match(
                    index[r["a"]],
                    index[r["b"]],
                    r["kind"],
                    r["inliers"],
                    r["votes"],
                    r["transform"],
                    r.get("correlation"),
                )
            )
        if timings is not None:
            timings["pairs_cached"] = 1
        return sorted(out, key=lambda m: (min(m.a, m.b), max(m.a, m.b)))
    matches = find_matches(features, **run)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps([{"a": keys[m.a], "b": keys[m.b], **m.evidence()} for m in matches])
        )
        tmp.replace(path)
    return matches


def features_of_files(
    paths: Sequence[str | Path], *, progress: Progress | None = None
) -> LocalFeatures:
    """`features_for` of every file (decoded here; keypoints reused from the cache by the
    file's sha256)."""

    def one(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img = decode_gray(path, min_side=1)
        return features_for(img.pixels, img.sha256)

    items = []
    with ThreadPoolExecutor(max_workers=2) as ex:
        for i, item in enumerate(ex.map(one, paths)):
            items.append(item)
            if progress:
                progress(i + 1, len(paths))
    return LocalFeatures.stack(items)
