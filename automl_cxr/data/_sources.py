"""Readers for the public sources and for a user's own data, all with one contract.

Every reader returns a `SourceTable`: a DataFrame with one row per image and the columns
`path` (absolute), `label`, `patient_id`, `source`, `view`, `license`, `split`, `finding`,
plus the counts of rows it excluded and why. Labels use the toolkit's vocabulary:
`covid`, `bacterial`, `viral`, `normal`, or `other` (a finding the recipes do not use).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from automl_cxr.data._dicom import dicom_split_groups, is_dicom
from automl_cxr.errors import DataError

__all__ = [
    "COLUMNS",
    "IMAGE_SUFFIXES",
    "SourceTable",
    "read_cohen",
    "read_csv_manifest",
    "read_folder",
    "read_kermany",
]

COLUMNS = ["path", "label", "patient_id", "source", "view", "license", "split", "finding"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
IMAGE_SUFFIXES |= {".dcm", ".dicom"}  # DICOM (data/_dicom.py); extension-less ones by magic
COHEN_FRONTAL_VIEWS = ("PA", "AP", "AP Supine")


@dataclass
class SourceTable:
    """Rows of one source in the shared contract, and what was left out."""

    name: str
    table: pd.DataFrame
    excluded: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in COLUMNS if c not in self.table.columns]
        if missing:
            raise DataError(f"source {self.name!r} table lacks columns {missing}")
        self.table = self.table[COLUMNS].reset_index(drop=True)


def _require_dir(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} not found at {path}. {hint}")


def read_cohen(root: str | Path) -> SourceTable:
    """Cohen et al. covid-chestxray-dataset: `metadata.csv` + `images/`.

    Frontal X-rays only (PA, AP, AP Supine); CT, lateral and views that are blank or '?' are
    excluded and counted. Label `covid` for findings starting with "COVID-19", else `other`.
    """
    root = Path(root)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise DataError(
            f"Cohen metadata not found at {meta}: expected the layout of "
            "github.com/ieee8023/covid-chestxray-dataset (metadata.csv + images/)"
        )
    df = pd.read_csv(meta, dtype=str, keep_default_na=False)
    need = {"patientid", "finding", "view", "modality", "filename"}
    if not need <= set(df.columns):
        raise DataError(f"{meta} lacks columns {sorted(need - set(df.columns))}")
    excluded: dict[str, int] = {}
    modality = df["modality"].str.strip()
    view = df["view"].str.strip()
    not_xray = modality != "X-ray"
    if not_xray.any():
        excluded["modality not X-ray (e.g. CT)"] = int(not_xray.sum())
    xr = df[~not_xray]
    xview = view[~not_xray]
    lateral = xview.isin(["L", "Lateral"])
    blank = xview.isin(["", "?"])
    other_view = ~xview.isin(COHEN_FRONTAL_VIEWS) & ~lateral & ~blank
    for mask, why in (
        (lateral, "lateral view"),
        (blank, "view blank or '?'"),
        (other_view, "non-frontal view"),
    ):
        if mask.any():
            excluded[why] = int(mask.sum())
    xr = xr[xview.isin(COHEN_FRONTAL_VIEWS)]
    images = root / xr.get("folder", pd.Series("images", index=xr.index)).replace("", "images")
    paths = [str((d / f).resolve()) for d, f in zip(images, xr["filename"], strict=True)]
    exists = pd.Series([Path(p).is_file() for p in paths], index=xr.index)
    if (~exists).any():
        excluded["image file missing"] = int((~exists).sum())
    finding = xr["finding"].str.strip()
    table = pd.DataFrame(
        {
            "path": paths,
            "label": ["covid" if f.startswith("COVID-19") else "other" for f in finding],
            "patient_id": "cohen:" + xr["patientid"].str.strip(),
            "source": "cohen",
            "view": xr["view"].str.strip(),
            "license": xr["license"].str.strip() if "license" in xr else "",
            "split": "",
            "finding": finding,
        },
        index=xr.index,
    )[exists.to_numpy()]
    return SourceTable("cohen", table, excluded)


_KERMANY_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
_KERMANY_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


def read_kermany(root: str | Path) -> SourceTable:
    """Kermany et al. pediatric set: `chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/`.

    Pneumonia files `personN_bacteria_M` / `personN_virus_M` give label and patient `personN`;
    normals `IM-XXXX-YYYY` / `NORMAL2-IM-XXXX-YYYY` give patient `IM-XXXX` / `NORMAL2-IM-XXXX`.
    """
    root = Path(root)
    base = root / "chest_xray" if (root / "chest_xray").is_dir() else root
    if not any((base / s).is_dir() for s in ("train", "test", "val")):
        raise DataError(
            f"Kermany data not found under {root}: expected chest_xray/{{train,test}}/"
            "{NORMAL,PNEUMONIA}/ as in Kermany et al. (doi:10.17632/rscbjbr9sj.2)"
        )
    rows = []
    excluded: dict[str, int] = {}
    for split_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for cls_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            cls = cls_dir.name.upper()
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                    continue
                if cls == "PNEUMONIA":
                    m = _KERMANY_PNEUMONIA.match(f.name)
                    if not m:
                        excluded["pneumonia file name without personN_bacteria/virus"] = (
                            excluded.get("pneumonia file name without personN_bacteria/virus", 0)
                            + 1
                        )
                        continue
                    patient, kind = m.group(1).lower(), m.group(2).lower()
                    label = "bacterial" if kind == "bacteria" else "viral"
                elif cls == "NORMAL":
                    m = _KERMANY_NORMAL.match(f.name)
                    patient = m.group(1).upper() if m else f.stem
                    label = "normal"
                else:
                    excluded[f"unknown class folder {cls_dir.name}"] = (
                        excluded.get(f"unknown class folder {cls_dir.name}", 0) + 1
                    )
                    continue
                rows.append(
                    {
                        "path": str(f.resolve()),
                        "label": label,
                        "patient_id": f"kermany:{patient}",
                        "source": "kermany",
                        "view": "PA",
                        "license": "CC BY 4.0",
                        "split": split_dir.name,
                        "finding": f"{cls.lower()}/{label}",
                    }
                )
    if not rows:
        raise DataError(f"no Kermany images found under {base}")
    return SourceTable("kermany", pd.DataFrame(rows), excluded)


def read_folder(root: str | Path, *, source: str | None = None) -> SourceTable:
    """A folder per class (`root/<label>/*.png`); nested folders below a class are included.

    Without patient ids each image is its own patient (say so to the user: the split can then
    only be as honest as the data allows).
    """
    root = Path(root)
    _require_dir(root, "folder", "Expected one sub-folder per class holding the images.")
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
    """A CSV with columns `path,label[,patient_id][,source][,view]`; relative paths are taken
    relative to the CSV's folder."""
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
    table = pd.DataFrame(
        {
            "path": paths,
            "label": df["label"].str.strip(),
            "patient_id": (
                name + ":" + df["patient_id"].astype(str)
                if "patient_id" in df
                else [f"{name}:{p}" for p in df.path]
            ),
            "source": df.get("source", name),
            "view": df.get("view", ""),
            "license": df.get("license", ""),
            "split": df.get("split", ""),
            "finding": df["label"].str.strip(),
        }
    )
    return SourceTable(name, dicom_split_groups(table, keep_given="patient_id" in df))
