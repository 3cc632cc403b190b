"""External sets inside a study (`search --external DIR`).

Each external set (a folder per class or a CSV manifest, as for `evaluate --data`) is prepared
once like a dataset (decoded, de-duplicated, cached) under `<data_dir>/external/`, checked to
share no image with the study's data, and handed to the engine: after each COMPLETE trial the
trial's fold models (averaged) predict it once. Its metrics are recorded as user attributes and
are never seen by the sampler, the pruner or the ranking.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from automl_cxr.data import (
    PreparedDataset,
    SourceTable,
    load_dataset,
    overlap_pairs,
    overlap_to_drop,
    prepare_table,
)
from automl_cxr.errors import ConfigError, DataError

__all__ = [
    "EXTERNAL_DIR",
    "external_attr_key",
    "external_name",
    "external_summary",
    "prepare_externals",
]

EXTERNAL_DIR = "external"
"""Sub-folder of the data directory that holds the prepared external sets."""


def external_name(path: str | Path) -> str:
    """The name an external set is recorded under: its folder name or CSV file stem, made of
    letters, digits and '_' (`external_<name>_<metric>` attributes)."""
    p = Path(path)
    stem = p.stem if p.suffix.lower() == ".csv" else p.name
    name = re.sub(r"[^0-9A-Za-z_]+", "_", stem).strip("_").lower()
    return name or "external"


def external_attr_key(name: str, metric: str) -> str:
    return f"external_{name}_{metric}"


def _listing_digest(table: Any) -> str:
    """What identifies the files of a set without decoding them: path, size, mtime, label."""
    h = hashlib.sha256()
    for path, label in zip(table["path"], table["label"], strict=True):
        try:
            st = os.stat(path)
            h.update(f"{path}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\t{label}\tmissing\n".encode())
    return h.hexdigest()


def prepare_externals(
    paths: Sequence[str | Path],
    *,
    dataset: PreparedDataset,
    data_dir: str | Path,
    label_map: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    drop_overlap: bool = False,
) -> list[PreparedDataset]:
    """Prepare (or reuse) every external set for a study on `dataset`.

    Labels are mapped with `label_map` (keys that are labels of none of the sets are an
    error) and must be classes of the study; a set may hold only some of them. A set sharing
    byte-identical images with the study's data is refused: it would not be external. So is a
    set holding a re-framed copy of a training image or a film of a training patient (the
    duplicate finder of `data/_duplicates.py`), unless `drop_overlap`: those images are then left
    out and listed in the set's `dropped_overlap`.
    """
    from automl_cxr.data import external_overlap, map_labels, read_external

    label_map = dict(label_map or {})
    tables = []
    for p in paths:
        table = read_external(p)
        tables.append((p, table))
    seen_labels = {str(v) for _, t in tables for v in t["label"].unique()}
    stray = sorted(set(label_map) - seen_labels)
    if stray:
        raise ConfigError(
            f"--external-label-map maps {stray}, which are labels of no external set; their "
            f"labels: {sorted(seen_labels)}"
        )
    root = Path(data_dir) / EXTERNAL_DIR
    names: set[str] = set()
    out: list[PreparedDataset] = []
    train_shas = (
        set(dataset.manifest["sha256"].astype(str)) if "sha256" in dataset.manifest else set()
    )
    for p, table in tables:
        here = {k: v for k, v in label_map.items() if k in set(table["label"].astype(str))}
        mapped = map_labels(table, here, dataset.classes)
        name, k = external_name(p), 2
        while name in names:
            name, k = f"{external_name(p)}_{k}", k + 1
        names.add(name)
        origin = str(Path(p).resolve())
        digest = _listing_digest(mapped)
        ext = _reuse(root, name, origin, digest)
        if ext is None:
            if log:
                log(f"preparing external set {name!r} from {p} ({len(mapped)} images)")
            prepare_table(
                SourceTable(name, mapped.assign(source=mapped["source"].astype(str))),
                name=name,
                data_dir=root,
                kind="external",
                origin=origin,
                positive=dataset.positive,
                min_classes=1,
                extra_meta={"listing_digest": digest, "label_map": here},
            )
            ext = load_dataset(name, root)
        overlap = external_overlap(ext.manifest, train_shas=train_shas)
        if overlap["byte_identical"]:
            raise DataError(
                f"external set {name!r} ({p}) is not external: {overlap['byte_identical']} of its "
                f"{len(ext)} images are byte-identical to images of dataset {dataset.name!r}. "
                "Remove them, or pass a set from other patients and sites"
            )
        pairs = overlap_pairs(
            ext.local_features(),
            ext.manifest["path"].astype(str).tolist(),
            dataset.local_features(),
            dataset.manifest["path"].astype(str).tolist(),
        )
        hit = overlap_to_drop(
            pairs,
            what=f"external set {name!r} ({p})",
            images=len(ext),
            dataset=dataset.name,
            drop=drop_overlap,
            recorded="recorded in the study",
        )
        if hit:
            keep = [i for i, q in enumerate(ext.manifest["path"].astype(str)) if q not in hit]
            ext = ext.subset(keep, tag="drop-overlap")
            ext.meta["dropped_overlap"] = pairs
            if log:
                log(
                    f"external set {name!r}: left out {len(hit)} image(s) that overlap "
                    f"{dataset.name!r} (--drop-overlap)"
                )
        out.append(ext)
    return out


def _reuse(root: Path, name: str, origin: str, digest: str) -> PreparedDataset | None:
    meta_file = root / name / "dataset.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("origin") != origin or meta.get("listing_digest") != digest:
        return None
    try:
        return load_dataset(name, root)
    except DataError:
        return None


def external_summary(externals: Sequence[PreparedDataset]) -> dict[str, dict[str, Any]]:
    """What a study stores about its external sets (never used for any choice)."""
    return {
        e.name: {
            "origin": e.meta.get("origin"),
            "dataset_hash": e.hash,
            "images": len(e),
            "classes": e.meta.get("classes"),
            "sources": e.meta.get("sources"),
            "label_map": e.meta.get("label_map"),
            "dropped_overlap": e.meta.get("dropped_overlap") or [],
        }
        for e in externals
    }
