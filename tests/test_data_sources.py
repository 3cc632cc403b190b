"""Source readers on the real shared X-rays: NIH ChestX-ray14, Cohen's findings, demographics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from automl_cxr.data import (
    COHEN_FINDINGS,
    cohen_label,
    read_cohen,
    read_csv_manifest,
    read_kermany,
    read_nih,
)
from automl_cxr.data._sources import cohen_site
from automl_cxr.errors import DataError


def test_nih_reader_labels_patients_ages(shared_data: Path) -> None:
    src = read_nih(shared_data / "nih")
    t = src.table
    assert len(t) == 621 and src.excluded == {}
    assert t["label"].value_counts().to_dict() == {"other": 521, "normal": 100}
    assert (t[t.label == "normal"]["finding"] == "No Finding").all()
    # multi-label findings kept whole; pneumonia-labelled images identifiable
    split = t["finding"].str.split("|")
    assert (split.map(len) > 1).sum() > 100
    assert not split.map(lambda f: "No Finding" in f and len(f) > 1).any()
    row = t[t.path.str.endswith("00000100_000.png")].iloc[0]
    assert row.finding == "Atelectasis|Effusion|Infiltration" and row.label == "other"
    assert row.patient_id == "nih:100" and row.age == 60.0 and row.sex == "M"
    assert t["finding"].str.split("|").map(lambda f: "Pneumonia" in f).sum() == 32
    # one image per patient in this copy; ids are namespaced
    assert t["patient_id"].str.startswith("nih:").all() and t["patient_id"].is_unique
    assert t["age"].dtype == float and t["age"].notna().all()
    assert (t["age"] >= 18).sum() == 602 and (t["age_group"] == "adult").sum() == 602
    assert (t["age_group"] == "child").sum() == 19
    assert ((t["label"] == "normal") & (t["age"] >= 18)).sum() == 98
    assert t["sex"].value_counts().to_dict() == {"M": 326, "F": 295}
    assert t["view"].value_counts().to_dict() == {"PA": 518, "AP": 103}
    assert set(t["site"]) == {"nih"} and set(t["source"]) == {"nih"}
    assert all(Path(p).is_file() for p in t["path"])


def test_nih_reader_full_release_layout(tmp_path: Path, shared_data: Path) -> None:
    """images_001/images/..., images_002/images/...; missing files excluded and counted; the
    2017 CSV's '058Y' ages."""
    root = tmp_path / "nih"
    files = sorted((shared_data / "nih" / "images").iterdir())
    for i, f in enumerate(files[:-5]):
        d = root / f"images_{1 + i % 2:03d}" / "images"
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(f, d / f.name)
    (root / "not_images").mkdir()
    os.symlink(files[-1], root / "not_images" / files[-1].name)  # not an images* folder
    meta = pd.read_csv(shared_data / "nih" / "Data_Entry_2017_v2020.csv", dtype=str)
    meta["Patient Age"] = meta["Patient Age"].map(lambda a: f"{int(a):03d}Y")
    meta.to_csv(root / "Data_Entry_2017.csv", index=False)
    src = read_nih(root)
    assert len(src.table) == 616 and src.excluded == {"image file missing": 5}
    assert (src.table["age"] >= 18).sum() == (
        pd.to_numeric(
            pd.read_csv(shared_data / "nih" / "Data_Entry_2017_v2020.csv")
            .set_index("Image Index")
            .loc[[f.name for f in files[:-5]], "Patient Age"]
        )
        >= 18
    ).sum()
    assert {Path(p).name for p in src.table["path"]} == {f.name for f in files[:-5]}


def test_nih_reader_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Data_Entry_2017_v2020.csv.*nihcc.app.box.com"):
        read_nih(tmp_path)


def test_cohen_findings_mapped_to_recipe_classes(shared_data: Path) -> None:
    t = read_cohen(shared_data / "cohen").table
    assert t["label"].value_counts().to_dict() == {
        "covid": 422,
        "uncertain": 61,
        "bacterial": 33,
        "viral": 21,
        "other": 20,
        "normal": 13,
    }
    for finding, label in t.groupby("finding")["label"].first().items():
        if not finding.startswith("COVID-19"):
            assert COHEN_FINDINGS[finding] == label, finding
    by = t.groupby("label")["finding"].unique().map(set).to_dict()
    assert by["uncertain"] == {"todo", "Unknown", "Pneumonia"}
    assert by["other"] == {"Pneumocystis", "Lipoid", "ARDS"}
    assert by["viral"] == {"SARS", "Varicella", "Influenza"}
    assert by["covid"] == {"COVID-19", "COVID-19, ARDS"}
    # the hierarchical findings of later upstream releases
    assert cohen_label("Pneumonia/Viral/COVID-19") == "covid"
    assert cohen_label("Pneumonia/Bacterial/Streptococcus") == "bacterial"
    assert cohen_label("Pneumonia/Bacterial/Nocardia") == "bacterial"
    assert cohen_label("Pneumonia/Viral/Herpes ") == "viral"
    assert cohen_label("Pneumonia/Fungal/Aspergillosis") == "other"
    assert cohen_label("Tuberculosis") == "uncertain"  # unlisted: never assumed non-COVID


def test_cohen_demographics_and_sites(shared_data: Path) -> None:
    t = read_cohen(shared_data / "cohen").table
    assert t["age"].dtype == float
    assert t["age"].notna().sum() == 417 and (t["age"] < 18).sum() == 1
    assert t["sex"].isin(["M", "F", ""]).all()
    assert t["site"].str.startswith("cohen:").all()
    assert (t["site"] == "cohen:unknown").sum() == 36
    assert (t["site"] == "cohen:hannover medical school, hannover, germany").sum() == 104
    assert cohen_site("  Hannover Medical School ,Hannover,  Germany ") == cohen_site(
        "HANNOVER MEDICAL SCHOOL, Hannover, Germany"
    )
    assert cohen_site(" ") == "cohen:unknown"
    # patient 197 was imaged at two hospitals: sites are per row
    assert t[t.patient_id == "cohen:197"]["site"].nunique() == 2


def test_kermany_children_one_site(shared_data: Path) -> None:
    t = read_kermany(shared_data / "kermany").table
    assert (t["age_group"] == "child").all() and t["age"].isna().all()
    assert set(t["site"]) == {"kermany"} and (t["sex"] == "").all()


def test_sites_distinct_across_sources(shared_data: Path) -> None:
    sites = {
        name: set(reader(shared_data / name).table["site"])
        for name, reader in (("cohen", read_cohen), ("kermany", read_kermany), ("nih", read_nih))
    }
    assert not (sites["cohen"] & sites["kermany"] | sites["cohen"] & sites["nih"])
    assert not sites["kermany"] & sites["nih"]


def test_csv_manifest_demographics(tmp_path: Path, shared_data: Path) -> None:
    imgs = sorted((shared_data / "kermany/chest_xray/test/NORMAL").iterdir())[:3]
    csv = tmp_path / "mine.csv"
    pd.DataFrame(
        {
            "path": [str(p) for p in imgs],
            "label": ["a", "b", "a"],
            "age": ["34", "", "7"],
            "sex": ["f", "M", ""],
            "site": ["ward 3", "", "ward 3"],
        }
    ).to_csv(csv, index=False)
    t = read_csv_manifest(csv).table
    np.testing.assert_array_equal(t["age"].to_numpy(), [34.0, np.nan, 7.0])
    assert t["sex"].tolist() == ["F", "M", ""]
    assert t["age_group"].tolist() == ["adult", "", "child"]
    assert t["site"].tolist() == ["mine:ward 3", "mine", "mine:ward 3"]
    pd.DataFrame({"path": [str(imgs[0])], "label": ["a"], "age": ["forty"]}).to_csv(
        csv, index=False
    )
    with pytest.raises(DataError, match="age must be a number of years or blank.*'forty'"):
        read_csv_manifest(csv)


def test_site_groups_merge_sites_sharing_a_patient(prepared_dir: Path) -> None:
    from automl_cxr.data import load_dataset, site_groups

    m = load_dataset("binary_adult", prepared_dir).manifest
    merged = pd.Series(site_groups(m["group_id"], m["site"]), index=m.index)
    assert (m.groupby("group_id")["site"].nunique() > 1).sum() == 2  # cohen 178/97 and 197
    assert (merged.groupby(m["group_id"]).nunique() == 1).all()  # no patient at two groups
    assert merged.nunique() == m["site"].nunique() - 2
    assert merged[m.site == "nih"].eq("nih").all()
    assert merged.str.contains("+", regex=False).sum() > 0  # merged sets are named by all sites
    # rows of a site that shares no patient keep their own site
    lone = m["site"] == "cohen:hong kong"
    assert merged[lone].eq("cohen:hong kong").all()
