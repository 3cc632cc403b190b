"""Copies between two sets (a training set and an external or test set): the pairs the
duplicate finder matches across them, which to drop, and how to say so."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from automl_cxr.data._duplicates import find_matches
from automl_cxr.data._keypoints import LocalFeatures
from automl_cxr.errors import DataError

__all__ = ["describe_overlap", "overlap_pairs", "overlap_to_drop"]


def overlap_pairs(
    ext_features: LocalFeatures,
    ext_paths: Sequence[str],
    train_features: LocalFeatures,
    train_paths: Sequence[str],
) -> list[dict[str, object]]:
    """Every image of an external set that is a copy of a training image or a film of a training
    patient, with the training image it matched and the evidence (`find_matches` of the two)."""
    return [
        {
            "external": str(ext_paths[m.a]),
            "training": str(train_paths[m.b]),
            "rule": (
                "same radiograph"
                if m.kind == "copy"
                else "same patient" + (", aligned texture" if m.correlation is not None else "")
            ),
            **m.evidence(),
        }
        for m in find_matches(ext_features, train_features, paths=ext_paths, base_paths=train_paths)
    ]


def overlap_to_drop(
    pairs: Sequence[dict[str, object]],
    *,
    what: str,
    images: int,
    dataset: str,
    drop: bool,
    recorded: str,
) -> set[str]:
    """The external paths of `pairs` (`overlap_pairs`) to leave out of `what` (a set of `images`
    images checked against `dataset`): an error naming the pairs unless `drop`, and an error when
    nothing would be left. `recorded` says where the dropped images are listed."""
    hit = {str(p["external"]) for p in pairs}
    if hit and not drop:
        raise DataError(
            f"{what} is not external: {len(hit)} of its {images} images are a copy of an image "
            f"of dataset {dataset!r} (re-framed: cropped, padded, resized, re-windowed or "
            "re-encoded) or a film of one of its patients (local keypoints, RANSAC-verified): "
            f"{describe_overlap(pairs)}. Remove them, or pass --drop-overlap to leave them out "
            f"({recorded})"
        )
    if hit and len(hit) == images:
        raise DataError(
            f"{what}: every image overlaps dataset {dataset!r}; nothing is left after "
            "--drop-overlap"
        )
    return hit


def describe_overlap(pairs: Sequence[dict[str, object]], limit: int = 5) -> str:
    """One line per pair (at most `limit`): 'ext.png ~ train.png (same radiograph, 212 inliers)'."""
    shown = [
        f"{Path(str(p['external'])).name} ~ {Path(str(p['training'])).name} "
        f"({p['rule']}, {p['inliers']} inliers)"
        for p in pairs[:limit]
    ]
    more = f"; ... and {len(pairs) - limit} more" if len(pairs) > limit else ""
    return "; ".join(shown) + more
