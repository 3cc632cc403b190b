"""Readers for the public sources and for a user's own data, all with one contract.

Every reader returns a `SourceTable`: a DataFrame with one row per image and the columns
`path` (absolute), `label`, `patient_id`, `source`, `view`, `license`, `split`, `finding`,
`age` (float years, NaN if unknown), `sex` (`M`, `F` or blank), `age_group` (`adult`, `child`
or blank), `site` (acquisition site, prefixed with the source so it is distinct across sources),
plus the counts of rows it excluded and why. Labels use the toolkit's vocabulary:
`covid`, `bacterial`, `viral`, `normal`, `other` (a non-COVID finding outside those classes), or
`uncertain` (a finding that does not say whether it is COVID-19: never used by a recipe).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from automl_cxr.errors import DataError

__all__ = [
    "ADULT_AGE",
    "COHEN_FINDINGS",
    "COLUMNS",
    "IMAGE_SUFFIXES",
    "KERMANY_SITE",
    "NIH_SITE",
    "SourceTable",
    "age_group",
    "cohen_label",
    "cohen_site",
    "read_cohen",
    "read_kermany",
    "read_nih",
    "require_dir",
]

COLUMNS = [
    "path",
    "label",
    "patient_id",
    "source",
    "view",
    "license",
    "split",
    "finding",
    "age",
    "sex",
    "age_group",
    "site",
]
DEMOGRAPHIC_COLUMNS = ("age", "sex", "age_group", "site")
"""Columns a reader may leave out: filled with unknown age/sex and the source as the site."""
ADULT_AGE = 18.0
MAX_PLAUSIBLE_AGE = 120.0  # older ages in a metadata file are typos: treated as unknown
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
IMAGE_SUFFIXES |= {".dcm", ".dicom"}  # DICOM (data/_dicom.py); extension-less ones by magic
COHEN_FRONTAL_VIEWS = ("PA", "AP", "AP Supine")


@dataclass
class SourceTable:
    """Rows of one source in the shared contract, and what was left out."""

    name: str
    table: pd.DataFrame
    excluded: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings for the user (kept in the meta)

    def __post_init__(self) -> None:
        missing = [c for c in COLUMNS if c not in self.table.columns]
        if [c for c in missing if c not in DEMOGRAPHIC_COLUMNS]:
            raise DataError(f"source {self.name!r} table lacks columns {missing}")
        self.table = fill_demographics(self.table)[COLUMNS].reset_index(drop=True)


def age_group(age: pd.Series) -> pd.Series:
    """`adult` (>= 18 years), `child`, or blank where the age is unknown."""
    a = pd.to_numeric(age, errors="coerce")
    out = pd.Series("", index=age.index, dtype=object)
    out[a >= ADULT_AGE] = "adult"
    out[a < ADULT_AGE] = "child"
    return out


def fill_demographics(table: pd.DataFrame) -> pd.DataFrame:
    """Add missing `age`/`sex`/`age_group`/`site` columns (unknown; site = the source) and
    give them their types: age float (NaN unknown), the others strings (blank unknown)."""
    t = table.copy()
    if "age" not in t:
        t["age"] = np.nan
    t["age"] = pd.to_numeric(t["age"].replace("", np.nan), errors="coerce").astype(float)
    t.loc[(t["age"] < 0) | (t["age"] > MAX_PLAUSIBLE_AGE), "age"] = np.nan
    if "sex" not in t:
        t["sex"] = ""
    t["sex"] = t["sex"].fillna("").astype(str).str.strip().str.upper().str[:1]
    t.loc[~t["sex"].isin(["M", "F"]), "sex"] = ""
    if "age_group" not in t:
        t["age_group"] = ""
    t["age_group"] = t["age_group"].fillna("").astype(str)
    derived = age_group(t["age"])
    known = t["age"].notna()
    t.loc[known, "age_group"] = derived[known]  # a known age always decides the group
    if "site" not in t:
        t["site"] = t["source"]
    t["site"] = t["site"].fillna("").astype(str)
    t.loc[t["site"].str.strip() == "", "site"] = t["source"]
    return t


def require_dir(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} not found at {path}. {hint}")


COHEN_FINDINGS: dict[str, str] = {
    # bacterial pneumonia
    "Streptococcus": "bacterial",
    "Klebsiella": "bacterial",
    "E.Coli": "bacterial",
    "Legionella": "bacterial",
    "Mycoplasma Bacterial Pneumonia": "bacterial",
    "Mycoplasma": "bacterial",
    "Chlamydophila": "bacterial",
    "Bacterial": "bacterial",
    # viral pneumonia other than COVID-19
    "SARS": "viral",
    "MERS": "viral",
    "MERS-CoV": "viral",
    "Varicella": "viral",
    "Influenza": "viral",
    # no finding
    "No Finding": "normal",
    # clearly not COVID-19, but outside the recipes' classes (fungal, lipoid, ARDS without
    # COVID-19: Cohen files COVID-19 ARDS as "COVID-19, ARDS")
    "Pneumocystis": "other",
    "Lipoid": "other",
    "ARDS": "other",
    # does not say whether it is COVID-19: never drawn by a recipe
    "todo": "uncertain",
    "Unknown": "uncertain",
    "Pneumonia": "uncertain",
}
"""Cohen's `finding` → recipe label (findings starting with "COVID-19" are `covid`). Keys are
matched case-insensitively on the last `/` component, so the hierarchical findings of later
upstream releases ("Pneumonia/Bacterial/Streptococcus") map too; an unlisted finding under
`.../Bacterial/...` or `.../Viral/...` maps to that class, anything else to `uncertain`."""

_COHEN_KEYS = {k.casefold(): v for k, v in COHEN_FINDINGS.items()}


def cohen_label(finding: str) -> str:
    """The recipe label of one Cohen `finding` (see COHEN_FINDINGS)."""
    f = finding.strip()
    parts = [p.strip() for p in f.split("/")]
    if f.startswith("COVID-19") or any(p.startswith("COVID-19") for p in parts):
        return "covid"
    leaf = parts[-1].casefold()
    if leaf in _COHEN_KEYS:
        return _COHEN_KEYS[leaf]
    lowered = [p.casefold() for p in parts[:-1]]
    if "bacterial" in lowered:
        return "bacterial"
    if "viral" in lowered:
        return "viral"
    if "fungal" in lowered:
        return "other"
    return "uncertain"


def cohen_site(location: str) -> str:
    """Cohen's free-text `location` as a site: whitespace and commas normalised, compared
    case-insensitively, prefixed `cohen:`; blank is `cohen:unknown`."""
    loc = re.sub(r"\s*,\s*", ", ", " ".join(str(location).split())).strip(" ,.")
    return "cohen:" + (loc.casefold() or "unknown")


def read_cohen(root: str | Path) -> SourceTable:
    """Cohen et al. covid-chestxray-dataset: `metadata.csv` + `images/`.

    Frontal X-rays only (PA, AP, AP Supine); CT, lateral and views that are blank or '?' are
    excluded and counted. Labels by COHEN_FINDINGS; `age`, `sex` and `location` (as `site`)
    come from the metadata.
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
    empty = pd.Series("", index=xr.index)
    table = pd.DataFrame(
        {
            "path": paths,
            "label": [cohen_label(f) for f in finding],
            "patient_id": "cohen:" + xr["patientid"].str.strip(),
            "source": "cohen",
            "view": xr["view"].str.strip(),
            "license": xr["license"].str.strip() if "license" in xr else "",
            "split": "",
            "finding": finding,
            "age": xr.get("age", empty),
            "sex": xr.get("sex", empty),
            "site": [cohen_site(x) for x in xr.get("location", empty)],
        },
        index=xr.index,
    )[exists.to_numpy()]
    return SourceTable("cohen", table, excluded)


NIH_SITE = "nih"
"""ChestX-ray14 comes from one hospital: the NIH Clinical Center, Bethesda, MD."""
NIH_LICENSE = "NIH Clinical Center: no restriction, attribution (Wang et al., CVPR 2017)"
NIH_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
_NIH_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
_NIH_AGE_UNIT = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def _nih_age(value: str) -> float:
    """`58`, `058Y` (the 2017 file) or `6M` as years; anything else is unknown (NaN)."""
    m = _NIH_AGE.match(str(value))
    if not m:
        return float("nan")
    return float(m.group(1)) * _NIH_AGE_UNIT[m.group(2).upper()]


def read_nih(root: str | Path) -> SourceTable:
    """NIH ChestX-ray14 (Wang et al. 2017): `Data_Entry_2017_v2020.csv` + `images*/` folders.

    Image files are found under any folder whose name starts with `images`, at any depth (the
    full release unpacks to `images_001/images/...`, `images_002/...`). `Finding Labels` is
    multi-label (`|`-separated): `No Finding` is label `normal`, anything else `other` with the
    findings kept in `finding` (e.g. `Infiltration|Pneumonia`). Every image predates COVID-19.
    Rows whose image file is missing are excluded and counted.
    """
    root = Path(root)
    csv = next((root / n for n in NIH_CSVS if (root / n).is_file()), None)
    if csv is None:
        raise DataError(
            f"NIH ChestX-ray14 metadata not found in {root}: expected {NIH_CSVS[0]} and "
            "images*/ folders as in https://nihcc.app.box.com/v/ChestXray-NIHCC"
        )
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    need = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{csv} lacks columns {missing}; expected the ChestX-ray14 header")
    files: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("images")):
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.setdefault(f.name, f)
    names = df["Image Index"].str.strip()
    found = names.map(files)
    excluded: dict[str, int] = {}
    if found.isna().any():
        excluded["image file missing"] = int(found.isna().sum())
    df, names, found = df[found.notna()], names[found.notna()], found[found.notna()]
    findings = df["Finding Labels"].map(
        lambda s: "|".join(x.strip() for x in str(s).split("|") if x.strip())
    )
    normal = findings == "No Finding"
    table = pd.DataFrame(
        {
            "path": [str(p.resolve()) for p in found],
            "label": np.where(normal, "normal", "other"),
            "patient_id": "nih:" + df["Patient ID"].str.strip(),
            "source": "nih",
            "view": df["View Position"].str.strip() if "View Position" in df else "",
            "license": NIH_LICENSE,
            "split": "",
            "finding": findings,
            "age": [_nih_age(a) for a in df["Patient Age"]],
            "sex": df["Patient Gender"],
            "site": NIH_SITE,
        },
        index=df.index,
    )
    if table.empty:
        raise DataError(f"no NIH image files found under {root}/images*/ for the rows of {csv}")
    return SourceTable("nih", table, excluded)


_KERMANY_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
_KERMANY_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


KERMANY_SITE = "kermany"
"""Kermany's set comes from one hospital: Guangzhou Women and Children's Medical Center."""


def read_kermany(root: str | Path) -> SourceTable:
    """Kermany et al. pediatric set: `chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/`.

    Its patients are children aged one to five (Kermany et al. 2018): `age_group` is `child`,
    the age of each image is not published (blank), and there is one site (`kermany`).

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
                        "age_group": "child",
                        "site": KERMANY_SITE,
                    }
                )
    if not rows:
        raise DataError(f"no Kermany images found under {base}")
    return SourceTable("kermany", pd.DataFrame(rows), excluded)
