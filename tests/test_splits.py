"""Patient-grouped stratified splits, checked on the real shared Cohen + Kermany data."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from automl_cxr.data import site_groups
from automl_cxr.engine import _splits
from automl_cxr.engine._splits import (
    Split,
    assert_no_patient_leakage,
    make_splits,
    split_summary,
)
from automl_cxr.errors import ConfigError, DataError

_KERMANY_SICK = re.compile(r"(person\d+)_(bacteria|virus)_")
_KERMANY_NORMAL = re.compile(r"((?:NORMAL2-)?IM-\d+)-")


def _shared_data() -> Path:
    candidates = [Path(p) for p in (os.environ.get("AUTOML_CXR_SOURCES"),) if p]
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared" / "data", Path("/work/shared/data")]
    for c in candidates:
        if (c / "cohen" / "metadata.csv").is_file() and (c / "kermany" / "chest_xray").is_dir():
            return c
    pytest.skip(f"shared CXR data not found (tried {', '.join(map(str, candidates))})")


def _real_labels_groups() -> tuple[np.ndarray, np.ndarray]:
    """Cohen COVID-19 frontal X-rays + Kermany normal/bacterial/viral, labelled by file name."""
    root = _shared_data()
    labels: list[str] = []
    groups: list[str] = []
    with open(root / "cohen" / "metadata.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["modality"] != "X-ray" or row["view"] not in ("PA", "AP", "AP Supine"):
                continue
            if row["finding"].startswith("COVID-19"):
                labels.append("covid")
                groups.append(f"cohen:{row['patientid']}")
    for path in sorted((root / "kermany" / "chest_xray").glob("*/*/*.jpeg")):
        if m := _KERMANY_SICK.match(path.name):
            labels.append("bacterial" if m[2] == "bacteria" else "viral")
            groups.append(f"kermany:{m[1]}")
        elif m := _KERMANY_NORMAL.match(path.name):
            labels.append("normal")
            groups.append(f"kermany:{m[1]}")
        else:  # pragma: no cover - would mean the shared data changed
            raise AssertionError(f"unexpected Kermany file name {path.name}")
    return np.array(labels), np.array(groups)


@pytest.fixture(scope="module")
def real() -> tuple[np.ndarray, np.ndarray]:
    y, g = _real_labels_groups()
    # The data has patients with several images, and ids shared by two classes (Kermany).
    assert np.unique(g[y == "covid"]).size < (y == "covid").sum()
    assert np.intersect1d(g[y == "bacterial"], g[y == "viral"]).size > 0
    return y, g


@pytest.fixture(scope="module")
def five_fold(real: tuple[np.ndarray, np.ndarray]) -> list[Split]:
    y, g = real
    return make_splits(y, g, n_folds=5, seed=0)


def _assert_grouped(splits: list[Split], g: np.ndarray) -> None:
    for s in splits:
        assert not set(g[s.train]) & set(g[s.val]), f"fold {s.fold} leaks patients"


def test_kfold_real_data_partition_grouping_stratification(
    real: tuple[np.ndarray, np.ndarray], five_fold: list[Split]
) -> None:
    y, g = real
    assert [s.fold for s in five_fold] == list(range(5))
    _assert_grouped(five_fold, g)
    val_count = np.zeros(y.size, dtype=int)
    for s in five_fold:
        val_count[s.val] += 1
        assert np.array_equal(np.sort(np.r_[s.train, s.val]), np.arange(y.size))
    assert np.all(val_count == 1), "every image must be in exactly one validation fold"
    for s in five_fold:
        for cls in np.unique(y):
            share = (y[s.val] == cls).sum() / (y == cls).sum()
            assert abs(share - 0.2) < 0.03, (s.fold, cls, share)


def test_kfold_deterministic_for_seed_and_differs_across_seeds(
    real: tuple[np.ndarray, np.ndarray], five_fold: list[Split]
) -> None:
    y, g = real
    assert make_splits(y, g, n_folds=5, seed=0) == five_fold
    other = make_splits(y, g, n_folds=5, seed=1)
    assert other != five_fold
    _assert_grouped(other, g)


def test_ten_fold_cohen_covid_vs_kermany_normal(real: tuple[np.ndarray, np.ndarray]) -> None:
    y, g = real
    keep = np.isin(y, ["covid", "normal"])
    yb = np.where(y[keep] == "covid", "covid", "non_covid")
    splits = make_splits(yb, g[keep], n_folds=10, seed=7)
    assert len(splits) == 10
    _assert_grouped(splits, g[keep])
    assert np.array_equal(np.sort(np.concatenate([s.val for s in splits])), np.arange(yb.size))


@pytest.mark.parametrize("fraction", [0.2, 0.35])
def test_holdout_real_data(real: tuple[np.ndarray, np.ndarray], fraction: float) -> None:
    y, g = real
    splits = make_splits(y, g, holdout=fraction, seed=3)
    assert len(splits) == 1
    (s,) = splits
    assert s.fold == 0
    _assert_grouped(splits, g)
    assert np.array_equal(np.sort(np.r_[s.train, s.val]), np.arange(y.size))
    assert abs(s.val.size / y.size - fraction) < 0.01
    for cls in np.unique(y):
        assert abs((y[s.val] == cls).sum() / (y == cls).sum() - fraction) < 0.03, cls
    assert make_splits(y, g, holdout=fraction, seed=3) == splits
    assert make_splits(y, g, holdout=fraction, seed=4) != splits


def test_holdout_small_keeps_each_class_on_both_sides() -> None:
    y = ["a"] * 4 + ["b"] * 4
    g = ["p1", "p1", "p2", "p2", "q1", "q2", "q3", "q3"]
    for seed in range(5):
        (s,) = make_splits(y, g, holdout=0.1, seed=seed)
        ya = np.array(y)
        assert set(ya[s.val]) == {"a", "b"} and set(ya[s.train]) == {"a", "b"}
        _assert_grouped([s], np.array(g))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_folds": 1}, "n_folds must be at least 2, but got n_folds=1"),
        ({"n_folds": 0}, "n_folds=0"),
        ({"n_folds": 2.5}, "n_folds=2.5"),
        ({"n_folds": 4}, "n_folds=4 is larger than the number of patients (3)"),
        ({"holdout": 0.0}, "holdout must be in (0, 0.5], but got holdout=0.0"),
        ({"holdout": 0.6}, "holdout=0.6"),
        ({"holdout": -0.1}, "holdout=-0.1"),
    ],
)
def test_bad_parameters_name_the_value(kwargs: dict, message: str) -> None:
    y = ["a"] * 6 + ["b"] * 3
    g = ["a1", "a2", "a3", "a4", "a5", "a6", "b1", "b2", "b3"]
    with pytest.raises(ConfigError) as err:
        make_splits(y, g, **kwargs)
    assert message in str(err.value)
    if "larger" in message:
        assert "'b'" in str(err.value) and "n_folds <= 3" in str(err.value)


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match=r"len\(labels\)=2 and len\(groups\)=3"):
        make_splits(["a", "b"], ["1", "2", "3"])
    with pytest.raises(ConfigError, match="labels must not be empty"):
        make_splits([], [])
    with pytest.raises(ConfigError, match=r"groups must not contain empty values.*\[1\]"):
        make_splits(["a", "a", "b", "b"], ["1", "", "3", "4"], n_folds=2)
    with pytest.raises(ConfigError, match="labels must not contain empty values"):
        make_splits(["a", None, "b", "b"], ["1", "2", "3", "4"], n_folds=2)
    with pytest.raises(ConfigError, match="at least 2 patients per class"):
        make_splits(["a", "a", "b", "b"], ["1", "1", "3", "4"], holdout=0.5)


def test_leakage_assertion_fires_on_handcrafted_split() -> None:
    groups = np.array(["p1", "p1", "p2", "p3", "p3", "p4"])
    ok = Split(fold=0, train=[0, 1, 2], val=[3, 4, 5])
    assert_no_patient_leakage([ok], groups)
    leaking = Split(fold=1, train=[0, 2, 3], val=[1, 4, 5])
    with pytest.raises(DataError, match=r"fold 1.*\['p1', 'p3'\]"):
        assert_no_patient_leakage([ok, leaking], groups)
    with pytest.raises(DataError, match="both train and val"):
        assert_no_patient_leakage([Split(fold=0, train=[0, 2], val=[2, 3])], groups)
    with pytest.raises(DataError, match="indices must be in"):
        assert_no_patient_leakage([Split(fold=0, train=[0], val=[9])], groups)


def test_make_splits_always_checks_leakage(monkeypatch: pytest.MonkeyPatch) -> None:
    class UngroupedKFold(StratifiedKFold):  # ignores groups, so it leaks
        def __init__(self, n_splits: int, shuffle: bool, random_state: int) -> None:
            super().__init__(n_splits=n_splits, shuffle=shuffle, random_state=random_state)

        def split(self, X, y, groups=None):  # noqa: N803
            return super().split(X, y)

    monkeypatch.setattr(_splits, "StratifiedGroupKFold", UngroupedKFold)
    y = ["a", "a", "a", "a", "b", "b", "b", "b"]
    g = ["p", "p", "q", "q", "r", "r", "s", "s"]
    with pytest.raises(DataError, match="patient leakage"):
        make_splits(y, g, n_folds=2, seed=0)


def test_split_summary(real: tuple[np.ndarray, np.ndarray], five_fold: list[Split]) -> None:
    y, _ = real
    summary = split_summary(five_fold, y)
    assert len(summary) == 5
    classes = sorted(set(y.tolist()))
    for row, s in zip(summary, five_fold, strict=True):
        assert row["fold"] == s.fold
        assert row["n_train"] == s.train.size and row["n_val"] == s.val.size
        assert sorted(row["val_counts"]) == classes
        assert sum(row["val_counts"].values()) == row["n_val"]
        assert sum(row["train_counts"].values()) == row["n_train"]
        assert all(type(v) is int for v in row["val_counts"].values())
    assert sum(r["n_val"] for r in summary) == y.size


def test_split_is_frozen_and_read_only() -> None:
    s = Split(fold=0, train=[3, 1], val=[2])
    assert s.train.tolist() == [1, 3]
    with pytest.raises(ValueError):
        s.train[0] = 5
    with pytest.raises(AttributeError):
        s.fold = 2  # type: ignore[misc]
    assert s == Split(fold=0, train=[1, 3], val=[2])
    assert s != Split(fold=1, train=[1, 3], val=[2])


# ----------------------------------------------------------------------------- site-held-out


def _cohen_sites() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen's frontal X-rays: covid / other (its non-COVID findings), patient, `location`."""
    labels, patients, sites = [], [], []
    with open(_shared_data() / "cohen" / "metadata.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["modality"] != "X-ray" or row["view"] not in ("PA", "AP", "AP Supine"):
                continue
            labels.append("covid" if row["finding"].startswith("COVID-19") else "other")
            patients.append(f"cohen:{row['patientid']}")
            sites.append(row["location"].strip() or "cohen:unknown")
    return np.array(labels), np.array(patients), np.array(sites)


def test_site_groups_merge_sites_that_share_a_patient() -> None:
    patients = ["p1", "p1", "p2", "p3", "p3", "p4"]
    sites = ["A", "B", "C", "C", "D", "E"]
    g = site_groups(patients, sites)
    assert g.tolist() == ["A+B", "A+B", "C+D", "C+D", "C+D", "E"]


def test_site_splits_on_real_cohen_locations_hold_out_sites_and_patients() -> None:
    y, p, s = _cohen_sites()
    splits, warnings = _splits.make_site_splits(y, p, s, n_folds=3, seed=0)
    assert len(splits) == 3 and warnings == []
    groups = site_groups(p, s)
    covered = np.concatenate([sp.val for sp in splits])
    assert np.array_equal(np.sort(covered), np.arange(y.size))
    for sp in splits:
        assert not set(s[sp.train]) & set(s[sp.val]), "a site on both sides"
        assert not set(groups[sp.train]) & set(groups[sp.val])
        assert not set(p[sp.train]) & set(p[sp.val]), "a patient on both sides"
        assert set(y[sp.train]) == {"covid", "other"}
    # a patient seen at two locations exists in the real data, and joins them
    multi = [pi for pi in np.unique(p) if np.unique(s[p == pi]).size > 1]
    assert multi and all(np.unique(groups[p == pi]).size == 1 for pi in multi)


def test_site_splits_fall_back_to_the_largest_feasible_k_with_a_warning() -> None:
    y, p, s = _cohen_sites()
    other_sites = site_groups(p, s)[y == "other"]
    k_max = np.unique(other_sites).size
    splits, warnings = _splits.make_site_splits(y, p, s, n_folds=k_max + 5, seed=0)
    assert len(splits) <= k_max and warnings
    assert f"n_folds={k_max + 5} site-held-out folds are not feasible" in warnings[0]
    assert "'other'" in warnings[0]
    for sp in splits:
        assert not set(s[sp.train]) & set(s[sp.val])


def test_site_splits_refuse_a_class_seen_at_one_site(real) -> None:
    y, g = real
    sites = np.where(np.char.startswith(g.astype(str), "cohen:"), g, "kermany")  # Kermany: 1 site
    with pytest.raises(ConfigError, match="class 'bacterial' is seen only at \\['kermany'\\]"):
        _splits.make_site_splits(y, g, sites, n_folds=5)


def test_site_holdout_and_members_hash() -> None:
    y, p, s = _cohen_sites()
    (sp,), warnings = _splits.make_site_splits(y, p, s, holdout=0.2, seed=1)
    assert not set(s[sp.train]) & set(s[sp.val]) and warnings == []
    ids = np.array([f"img{i}" for i in range(y.size)])
    h = _splits.members_hash(ids, sp.val)
    assert h == _splits.members_hash(ids[::-1], (y.size - 1 - sp.val)[::-1])  # order-free
    assert h != _splits.members_hash(ids, sp.train)
    assert len(h) == 64
