"""Your own images as a source table: a folder per class (`read_folder`) or a CSV manifest
(`read_csv_manifest`), with the shared columns of the public sources (`_sources.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from automl_cxr.data._dicom import dicom_split_groups, is_dicom
from automl_cxr.data._sources import IMAGE_SUFFIXES, SourceTable, require_dir
from automl_cxr.errors import DataError

__all__ = ["read_csv_manifest", "read_folder"]


def read_folder(root: str | Path, *, source: str | None = None) -> SourceTable:
    """A folder per class (`root/<label>/*.png`); nested folders below a class are included.

    Without patient ids each image is its own patient (say so to the user: the split can then
    only be as honest as the data allows).
    """
    root = Path(root)
    require_dir(root, "folder", "Expected one sub-folder per class holding the images.")
    rows = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(cls_dir.rglob("*")):
            if f.is_file() and (f.suffix.lower() in IMAGE_SUFFIXES or is_dicom(f)):
                rows.append(
                    {
                        "path": str(f.resolve()),
                        "label": cls_dir.name,
                        "patient_id": f"{source or root.name}:{f.relative_to(root).as_posix()}",
                        "source": source or root.name,
                        "view": "",
                        "license": "",
                        "split": "",
                        "finding": cls_dir.name,
                    }
                )
    if not rows:
        raise DataError(
            f"no images found in {root}: expected one sub-folder per class "
            f"holding files with suffixes {sorted(IMAGE_SUFFIXES)}"
        )
    return SourceTable(source or root.name, dicom_split_groups(pd.DataFrame(rows)))


def read_csv_manifest(file: str | Path, *, source: str | None = None) -> SourceTable:
    """A CSV with columns `path,label[,patient_id][,source][,view][,age][,sex][,site]`;
    relative paths are taken relative to the CSV's folder. A `site` is prefixed with the
    source (`mine:ward-3`); without one the source is the site."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"CSV manifest not found: {file}")
    df = pd.read_csv(file, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DataError(
            f"CSV manifest {file} lacks column(s) {missing}; expected path,label[,patient_id]"
        )
    if df.empty:
        raise DataError(f"CSV manifest {file} has no rows")
    name = source or file.stem
    paths = [str((file.parent / p).resolve()) if not Path(p).is_absolute() else p for p in df.path]
    empty_labels = df.index[df["label"].str.strip() == ""].tolist()
    if empty_labels:
        raise DataError(f"CSV manifest {file}: empty label in row(s) {empty_labels[:10]}")
    notes: list[str] = []
    own = [f"{name}:{p}" for p in df.path]  # no id: each image its own patient
    if "patient_id" in df:
        given = df["patient_id"].astype(str).str.strip()
        blank = (given == "").to_numpy()
        patient = np.where(blank, own, name + ":" + given)
        if blank.any():
            rows = df.index[blank].tolist()
            notes.append(
                f"CSV manifest {file}: {int(blank.sum())} row(s) have a blank patient_id "
                f"(e.g. row(s) {rows[:5]}); each is treated as its own patient, so a patient "
                "with several such images could straddle folds: fill in the ids to avoid it"
            )
    else:
        patient = own
    table = pd.DataFrame(
        {
            "path": paths,
            "label": df["label"].str.strip(),
            "patient_id": patient,
            "source": df.get("source", name),
            "view": df.get("view", ""),
            "license": df.get("license", ""),
            "split": df.get("split", ""),
            "finding": df["label"].str.strip(),
            "age": df.get("age", ""),
            "sex": df.get("sex", ""),
        }
    )
    if "age" in df:
        bad = pd.to_numeric(df["age"].replace("", np.nan), errors="coerce").isna() & (
            df["age"].str.strip() != ""
        )
        if bad.any():
            rows = df.index[bad].tolist()[:10]
            raise DataError(
                f"CSV manifest {file}: age must be a number of years or blank, but got "
                f"{df['age'][bad].iloc[0]!r} in row(s) {rows}"
            )
    if "site" in df:
        site = df["site"].astype(str).str.strip()
        table["site"] = np.where(site != "", table["source"] + ":" + site, table["source"])
    return SourceTable(name, dicom_split_groups(table, keep_given="patient_id" in df), notes=notes)
