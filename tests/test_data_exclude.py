"""`data prepare --exclude`: a held-out set, and every other image of its patients, stays out of
every recipe (issue 12 §5: external sets built from the shared sources)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from automl_cxr.cli import main
from automl_cxr.data import load_dataset, prepare_recipes, read_cohen, read_nih


def test_excluded_images_and_their_patients_are_in_no_recipe(
    shared_data: Path, tmp_path: Path
) -> None:
    cohen = read_cohen(shared_data / "cohen").table
    covid = cohen[cohen["label"] == "covid"]
    # one patient with several films: list only ONE of them, the others must go too
    multi = covid.groupby("patient_id").filter(lambda g: len(g) >= 3)["patient_id"].iloc[0]
    films = covid[covid["patient_id"] == multi]
    nih = read_nih(shared_data / "nih").table.head(5)
    held = pd.concat([films.head(1), nih])
    csv = tmp_path / "held.csv"
    held[["path", "label", "patient_id"]].to_csv(csv, index=False)
    out = tmp_path / "data"
    prepare_recipes(
        cohen=shared_data / "cohen", kermany=None, nih=shared_data / "nih", data_dir=out,
        recipes=["binary_adult"], exclude=[csv],
    )  # fmt: skip
    ds = load_dataset("binary_adult", out)
    shas = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in held["path"]}
    assert not shas & set(ds.manifest["sha256"])
    assert not set(ds.manifest["patient_id"]) & ({multi} | set(nih["patient_id"]))
    info = ds.meta["excluded_sets"]
    assert info["images_matched"] == len(held)
    assert info["images_removed"] >= len(films) + len(nih) > info["images_matched"]
    # Without --exclude the same patients are drawn (the shared copy holds them all).
    prepare_recipes(
        cohen=shared_data / "cohen", kermany=None, nih=shared_data / "nih",
        data_dir=tmp_path / "all", recipes=["binary_adult"],
    )  # fmt: skip
    assert multi in set(load_dataset("binary_adult", tmp_path / "all").manifest["patient_id"])


def test_exclude_bad_input_is_a_clear_error(shared_data: Path, tmp_path: Path, capsys) -> None:
    args = ["data", "prepare", "--sources", str(shared_data), "--data-dir", str(tmp_path / "d")]
    code = main([*args, "--exclude", str(tmp_path / "nope.txt"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "nope.txt" in err and "CSV manifest" in err and "Traceback" not in err
    assert not (tmp_path / "d" / "binary").exists()
