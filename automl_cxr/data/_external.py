"""External sets as the data layer reads them: a folder per class or a CSV manifest, labels
mapped onto a study's classes, and the check that an 'external' set is not a training source
after all. Used by `search --external` (study), `evaluate --data` (deploy) and `data
duplicates` (CLI)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from automl_cxr.data._folders import read_csv_manifest, read_folder
from automl_cxr.errors import ConfigError, DataError

__all__ = ["external_overlap", "map_labels", "read_external"]


def read_external(data: str | Path) -> pd.DataFrame:
    """Rows (path, label, patient_id, source, ...) of a folder-per-class dir or CSV manifest."""
    p = Path(data)
    if p.is_dir():
        return read_folder(p).table
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise DataError(
                f"--data {p} is a file but not a CSV manifest (.csv); pass a folder with one "
                "sub-folder per class, or a CSV with columns path,label[,patient_id]"
            )
        return read_csv_manifest(p).table
    raise DataError(
        f"--data {p} not found: pass a folder with one sub-folder per class, or a CSV manifest "
        "with columns path,label[,patient_id]"
    )


def map_labels(
    table: pd.DataFrame, label_map: Mapping[str, str] | None, classes: list[str]
) -> pd.DataFrame:
    """Rename external labels onto the study's classes (`{"NORMAL": "normal"}`); every label
    must end up in `classes`, or a DataError lists the strays and the allowed ones."""
    label_map = dict(label_map or {})
    have = sorted(table["label"].astype(str).unique())
    unknown_keys = sorted(set(label_map) - set(have))
    if unknown_keys:
        raise ConfigError(
            f"--label-map maps {unknown_keys}, which are not labels of the external set; "
            f"its labels: {have}"
        )
    mapped = table.assign(label=table["label"].astype(str).map(lambda s: label_map.get(s, s)))
    stray = sorted(set(mapped["label"]) - set(classes))
    if stray:
        hint = []
        for s in stray:
            src = [k for k, v in label_map.items() if v == s] or [s]
            close = [c for c in classes if c.lower() == s.lower()]
            if close and src == [s]:
                hint.append(f"{s}={close[0]}")
        tip = f" (e.g. --label-map {','.join(hint)})" if hint else ""
        raise DataError(
            f"external label(s) {stray} are not classes of the study; allowed: {classes}. Map "
            f"them with --label-map EXTERNAL=CLASS{tip}"
        )
    return mapped


def _under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(path), root]) == root
    except ValueError:
        return False


def external_overlap(
    table: pd.DataFrame,
    *,
    train_shas: set[str] | None = None,
    train_sources: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Is the 'external' set really external? Counts images byte-identical to training images,
    images under a training source's folder, and source names shared with training.

    `train_sources`: ``{source: {"root": folder}}`` (see `source_roots`). Returns
    ``{"byte_identical", "same_source": {source: n}, "same_source_name": [..], "warning"}``.
    """
    shas = table.get("sha256", pd.Series([], dtype=str)).astype(str)
    identical = int(shas.isin(train_shas or set()).sum())
    same_source: dict[str, int] = {}
    for src, info in (train_sources or {}).items():
        root = str(info.get("root") or "")
        if not root or len(Path(root).parts) < 3:  # "/" or "/home": too broad to mean anything
            continue
        n = int(sum(_under(p, root) for p in table["path"]))
        if n:
            same_source[str(src)] = n
    names = sorted(set(table["source"].astype(str)) & set(train_sources or {}))
    parts = []
    if identical:
        parts.append(f"{identical} of {len(table)} images are byte-identical to training images")
    if same_source:
        parts.append(
            "; ".join(
                f"{n} of {len(table)} images lie in the folder of training source {s!r} "
                f"({train_sources[s]['root']})"
                for s, n in same_source.items()
            )
        )
    if names:
        parts.append(f"the set's source name(s) {names} are training sources")
    warning = None
    if parts:
        warning = (
            "NOT AN EXTERNAL SET: "
            + "; ".join(parts)
            + ". Images from a training source share its hospital, scanner and population, so "
            "these numbers do not show how the model does elsewhere (and a shortcut learnt "
            "from the source still pays off here)"
        )
    return {
        "byte_identical": identical,
        "same_source": same_source,
        "same_source_name": names,
        "warning": warning,
    }
