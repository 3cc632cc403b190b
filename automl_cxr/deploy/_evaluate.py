"""Evaluate a model on an external set (folder per class or CSV manifest) never seen in the
search: the study's metrics with bootstrap confidence intervals, and a loud warning when the
'external' images come from a training source after all."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from automl_cxr.data import decode_gray, map_labels, read_external, resize_square
from automl_cxr.engine import bootstrap_metrics, compute_metrics
from automl_cxr.errors import DataError, ImageDecodeError

__all__ = ["ExternalSet", "evaluate_predictions", "load_external"]


@dataclass
class ExternalSet:
    """Decoded external images at the model's resolution, with labels mapped to class indices."""

    table: pd.DataFrame  # usable rows: path, label (mapped), patient_id, source, sha256 ...
    images: np.ndarray  # (N, R, R) uint8
    labels: np.ndarray  # (N,) class indices
    classes: list[str]
    label_map: dict[str, str]
    rejected: list[dict[str, str]] = field(default_factory=list)

    @property
    def groups(self) -> np.ndarray | None:
        """Patient ids, when the set has them (some patient with several images)."""
        pid = self.table["patient_id"].astype(str)
        return pid.to_numpy() if pid.nunique() < len(pid) else None

    def tensor(self) -> np.ndarray:
        return (self.images.astype(np.float32) / 255.0)[:, None]

    def without(self, paths: set[str]) -> ExternalSet:
        """The set without the rows of `paths`."""
        keep = ~self.table["path"].astype(str).isin(paths).to_numpy()
        return ExternalSet(
            self.table[keep].reset_index(drop=True),
            self.images[keep],
            self.labels[keep],
            self.classes,
            self.label_map,
            self.rejected,
        )


def load_external(
    data: str | Path,
    classes: list[str],
    resolution: int,
    *,
    label_map: Mapping[str, str] | None = None,
    skip_bad: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExternalSet:
    """Read, map and decode an external set like the data layer does (decode_gray →
    resize_square). An unreadable file is a DataError naming it, unless `skip_bad`."""
    table = map_labels(read_external(data), label_map, classes)
    paths = table["path"].tolist()

    def one(path: str) -> tuple[np.ndarray | None, str, str | None]:
        try:
            img = decode_gray(path)
        except ImageDecodeError as exc:
            return None, "", exc.reason
        return resize_square(img.pixels, resolution), img.sha256, None

    results: list[tuple[np.ndarray | None, str, str | None]] = []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        for i, r in enumerate(ex.map(one, paths)):
            results.append(r)
            if progress:
                progress(i + 1, len(paths))
    rejected = [
        {"path": p, "reason": r[2]} for p, r in zip(paths, results, strict=True) if r[2] is not None
    ]
    if rejected and not skip_bad:
        lines = "\n".join(f"  {r['path']}: {r['reason']}" for r in rejected[:20])
        more = f"\n  ... and {len(rejected) - 20} more" if len(rejected) > 20 else ""
        raise DataError(
            f"{len(rejected)} external image(s) cannot be used:\n{lines}{more}\n"
            "Fix or remove them, or pass --skip-bad to leave them out."
        )
    ok = [i for i, r in enumerate(results) if r[2] is None]
    if not ok:
        raise DataError(f"no usable image in {data} (all {len(paths)} were rejected)")
    table = table.iloc[ok].reset_index(drop=True).assign(sha256=[results[i][1] for i in ok])
    images = np.stack([results[i][0] for i in ok]).astype(np.uint8)
    index = {c: k for k, c in enumerate(classes)}
    labels = table["label"].map(index).to_numpy(dtype=np.int64)
    return ExternalSet(table, images, labels, list(classes), dict(label_map or {}), rejected)


def evaluate_predictions(
    probs: np.ndarray,
    ext: ExternalSet,
    *,
    positive: str | None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """compute_metrics + bootstrap CIs (over patients when the set has patient ids, else
    images), and per-source metrics when the set has several sources."""
    metrics = compute_metrics(ext.labels, probs, ext.classes, positive=positive)
    boot = bootstrap_metrics(
        ext.labels,
        probs,
        ext.classes,
        positive=positive,
        n_boot=n_boot,
        seed=seed,
        groups=ext.groups,
    )
    counts = {c: int((ext.labels == k).sum()) for k, c in enumerate(ext.classes)}
    missing = [c for c, n in counts.items() if n == 0]
    notes = []
    if missing:
        notes.append(
            f"the external set has no {missing} images: their sensitivity is undefined and "
            "balanced accuracy / AUC are over the classes present"
        )
    sources = ext.table["source"].astype(str).to_numpy()
    by_source = None
    if len(set(sources)) > 1:
        by_source = {
            s: compute_metrics(
                ext.labels[sources == s], probs[sources == s], ext.classes, positive=positive
            )
            for s in sorted(set(sources))
        }
    return {
        "n_images": len(ext.labels),
        "counts": counts,
        "metrics": metrics,
        "bootstrap": boot,
        "by_source": by_source,
        "notes": notes,
    }
