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

from automl_cxr.data import (
    SourceTable,
    decode_gray,
    map_labels,
    read_external,
    resize_square,
    scan_pool,
)
from automl_cxr.engine import bootstrap_metrics, compute_metrics
from automl_cxr.errors import DataError

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
        """Split groups (patients, merged where copies joined them), when some group holds
        several images; the bootstrap resamples them."""
        col = "group_id" if "group_id" in self.table else "patient_id"
        pid = self.table[col].astype(str)
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
    """Read and map an external set, then the data layer's own pipeline (`scan_pool`): every
    file decoded and checked (an unreadable one is a DataError naming it, unless `skip_bad`),
    exact copies removed and re-framed copies merged into one row, as `search --external`
    prepares a set; the kept images resized to `resolution`."""
    table = map_labels(read_external(data), label_map, classes)
    source = SourceTable("external", table.assign(source=table["source"].astype(str)))
    pool, info, _ = scan_pool([source], skip_bad=skip_bad, progress=progress, noun="external image")
    rejected = list(info["rejected"])
    if pool.empty:
        raise DataError(f"no usable image in {data} (all {len(table)} were rejected)")
    paths = pool["path"].astype(str).tolist()

    def one(path: str) -> np.ndarray:
        return resize_square(decode_gray(path).pixels, resolution)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        images = np.stack(list(ex.map(one, paths))).astype(np.uint8)
    table = pool.drop(columns=["_feature_row"], errors="ignore").reset_index(drop=True)
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
