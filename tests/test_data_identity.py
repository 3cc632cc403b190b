"""Dataset identity (issue 13.1): one manifest hash is one row order, and cached pixels always
belong to their row, however the input rows were ordered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from automl_cxr.cli import main
from automl_cxr.data import (
    PreparedDataset,
    decode_gray,
    load_dataset,
    prepare_table,
    read_csv_manifest,
    resize_square,
)
from automl_cxr.errors import DataError

SIZE = 32


def _csv(shared_data: Path, path: Path, order: np.ndarray | None = None) -> pd.DataFrame:
    k = shared_data / "kermany" / "chest_xray"
    rows = [(p, "normal") for p in sorted((k / "test" / "NORMAL").iterdir())[:10]]
    rows += [(p, "pneumonia") for p in sorted((k / "test" / "PNEUMONIA").iterdir())[:10]]
    df = pd.DataFrame(
        {
            "path": [str(p) for p, _ in rows],
            "label": [lab for _, lab in rows],
            "patient_id": [p.stem for p, _ in rows],
        }
    )
    if order is not None:
        df = df.iloc[order].reset_index(drop=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return df


def _assert_rows_own_pixels(ds: PreparedDataset, truth: pd.DataFrame) -> None:
    """Every cached image is its row's file, and every row keeps its file's label."""
    arr = np.asarray(ds.images(SIZE))
    label_of = dict(zip(truth["path"], truth["label"], strict=True))
    for i, row in ds.manifest.iterrows():
        fresh = resize_square(decode_gray(row["path"]).pixels, SIZE)
        np.testing.assert_array_equal(arr[i], fresh, err_msg=f"row {i} ({row['path']})")
        assert row["label"] == label_of[row["path"]]
        assert ds.classes[ds.labels[i]] == row["label"]


def test_reordered_csv_never_gets_another_rows_pixels(tmp_path: Path, shared_data: Path) -> None:
    data = tmp_path / "data"
    # (the same file name: patient ids are prefixed with it)
    first = _csv(shared_data, tmp_path / "a" / "x.csv")
    prepare_table(
        read_csv_manifest(tmp_path / "a" / "x.csv"),
        name="mine",
        data_dir=data,
        kind="csv",
        origin="a/x.csv",
    )
    a = load_dataset("mine", data)
    _assert_rows_own_pixels(a, first)  # writes the cache
    # the same rows in another order, prepared again into the same data dir (cache/ kept)
    order = np.random.default_rng(3).permutation(len(first))
    second = _csv(shared_data, tmp_path / "b" / "x.csv", order)
    argv = ["data", "prepare", "--csv", str(tmp_path / "b" / "x.csv"), "--name", "mine", "-q"]
    assert main(argv + ["--data-dir", str(data)]) == 0
    b = load_dataset("mine", data)
    _assert_rows_own_pixels(b, second)  # before the fix: every row got another row's image
    assert b.hash == a.hash  # same content, same identity ...
    assert b.manifest["path"].tolist() == a.manifest["path"].tolist()  # ... and same row order
    assert b.cache_path(SIZE) == a.cache_path(SIZE) and b.cache_path(SIZE).is_file()


def test_cache_is_keyed_by_row_order(tmp_path: Path, shared_data: Path) -> None:
    truth = _csv(shared_data, tmp_path / "a.csv")
    root = prepare_table(
        read_csv_manifest(tmp_path / "a.csv"), name="m", data_dir=tmp_path, kind="csv", origin="a"
    )
    ds = load_dataset("m", tmp_path)
    ds.images(SIZE)
    # a manifest in another order under the same content hash (built by hand, not loaded)
    flipped = PreparedDataset(root, ds.manifest.iloc[::-1].reset_index(drop=True), ds.meta)
    assert flipped.hash == ds.hash and flipped.row_digest != ds.row_digest
    assert flipped.cache_path(SIZE) != ds.cache_path(SIZE)
    _assert_rows_own_pixels(flipped, truth)
    # a version-1 cache file (keyed by the content hash alone) is never read back
    stale = root / "cache" / f"{ds.hash[:16]}_v1_{SIZE}px.npy"
    np.save(stale, np.zeros((len(ds), SIZE, SIZE), np.uint8))
    _assert_rows_own_pixels(load_dataset("m", tmp_path), truth)
    # preparing again removes image caches of other contents or orders, keeps its own
    prepare_table(
        read_csv_manifest(tmp_path / "a.csv"), name="m", data_dir=tmp_path, kind="csv", origin="a"
    )
    assert sorted(p.name for p in (root / "cache").iterdir()) == [ds.cache_path(SIZE).name]


def test_manifest_written_and_loaded_in_canonical_order(tmp_path: Path, prepared_dir: Path) -> None:
    ds = load_dataset("four_class", prepared_dir)
    m = ds.manifest
    assert m["sha256"].is_monotonic_increasing and m["sha256"].is_unique
    on_disk = pd.read_csv(prepared_dir / "four_class" / "manifest.csv", dtype=str)
    assert on_disk["path"].tolist() == m["path"].tolist()
    # a manifest an older version wrote: class order, no age/sex/age_group/site columns
    old = tmp_path / "four_class"
    old.mkdir()
    legacy = on_disk.drop(columns=["age", "sex", "age_group", "site"]).sort_values(
        ["label", "patient_id"]
    )
    legacy.to_csv(old / "manifest.csv", index=False)
    meta = json.loads((prepared_dir / "four_class" / "dataset.json").read_text())
    (old / "dataset.json").write_text(json.dumps(meta))
    back = load_dataset("four_class", tmp_path)
    assert back.hash == ds.hash
    assert back.manifest["path"].tolist() == m["path"].tolist()
    assert back.manifest["age"].dtype == float and back.manifest["age"].isna().all()
    assert set(back.manifest["site"]) == {"cohen", "kermany"}  # one site per source
    assert (back.manifest[back.manifest.source == "kermany"]["age_group"] == "child").all()
    np.testing.assert_array_equal(back.labels, ds.labels)


def test_hand_edited_manifest_is_refused(tmp_path: Path, prepared_dir: Path) -> None:
    """A manifest changed after `data prepare` (a label flipped, a row dropped) no longer matches
    the hash its image and feature caches are keyed by: an error naming it, not misaligned rows.
    Fails on the code before the check (it loaded both)."""
    src = prepared_dir / "three_class"
    on_disk = pd.read_csv(src / "manifest.csv", dtype=str, keep_default_na=False)
    meta = (src / "dataset.json").read_text()
    flipped = on_disk.copy()
    first = flipped.index[flipped["label"] == "covid"][0]
    flipped.loc[first, "label"] = "normal"
    for name, table in (("flipped", flipped), ("dropped", on_disk.iloc[1:])):
        (tmp_path / name).mkdir()
        table.to_csv(tmp_path / name / "manifest.csv", index=False)
        (tmp_path / name / "dataset.json").write_text(meta)
        with pytest.raises(DataError, match="does not match the manifest_hash.*Prepare it again"):
            load_dataset(name, tmp_path)
    (tmp_path / "same").mkdir()
    on_disk.sample(frac=1, random_state=0).to_csv(tmp_path / "same" / "manifest.csv", index=False)
    (tmp_path / "same" / "dataset.json").write_text(meta)
    assert load_dataset("same", tmp_path).hash == load_dataset("three_class", prepared_dir).hash


def test_manifest_columns_load_with_their_types(prepared_dir: Path) -> None:
    m = load_dataset("binary_adult", prepared_dir).manifest
    assert m["age"].dtype == float
    for col in ("patient_id", "group_id", "sex", "site", "age_group", "label", "sha256"):
        assert m[col].map(type).eq(str).all(), col
    assert set(m["sex"]) <= {"M", "F", ""} and set(m["age_group"]) <= {"adult", "child", ""}


def test_subset_identity_follows_rows(prepared_dir: Path) -> None:
    ds = load_dataset("three_class", prepared_dir)
    a = ds.subset([5, 1, 9], tag="t")
    b = ds.subset([1, 5, 9], tag="t")
    assert a.hash != b.hash  # another row order is another dataset
    assert a.manifest["path"].tolist() == ds.manifest["path"].iloc[[5, 1, 9]].tolist()
    full = np.asarray(ds.images(SIZE))
    np.testing.assert_array_equal(np.asarray(a.images(SIZE)), full[[5, 1, 9]])
