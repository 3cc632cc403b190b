"""Shortcut diagnostics on the real shared data: the image-based source probe, the lung-blanked
control run, per-source metrics and `automl-cxr diagnose`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from automl_cxr.cli import main
from automl_cxr.data import PreparedDataset, load_dataset
from automl_cxr.diagnostics import (
    blank_box,
    blank_center,
    blanked_dataset,
    control_verdict,
    per_source_table,
    shortcut_warning,
    source_diagnostics,
    source_probe,
)
from automl_cxr.errors import ConfigError

# ----------------------------------------------------------------------------- source probe


def test_source_probe_fires_on_paper_recipe(smoke_study: Path, prepared_dir: Path) -> None:
    ds = load_dataset("three_class", prepared_dir)  # 64 px images cached by the study
    d = source_diagnostics(ds, resolution=64)
    assert d["alignment"]["cramers_v"] > 0.9
    assert d["probe"]["sources"] == {"cohen": 224, "kermany": len(ds) - 224}
    assert d["probe"]["n_folds"] == 5
    assert d["probe"]["auc"] >= 0.9, d["probe"]
    assert d["probe"]["predictable"] is True
    assert d["warning"] and "predictable from the pixels" in d["warning"]
    assert "Cramér's V = 1.00" in d["warning"]
    assert d["warnings"] == [d["warning"]]  # it says what the manifest's warning says
    assert d["alignment"]["warning"] and "Cramér's V" in d["alignment"]["warning"]


def test_source_probe_quiet_when_sources_independent(smoke_study: Path, prepared_dir: Path) -> None:
    ds = load_dataset("three_class", prepared_dir)
    rng = np.random.default_rng(0)
    groups = np.unique(ds.groups)
    site = dict(zip(groups, rng.choice(["site_a", "site_b"], len(groups)), strict=True))
    fake = PreparedDataset(
        ds.root, ds.manifest.assign(source=[site[g] for g in ds.groups]), ds.meta
    )
    d = source_diagnostics(fake, resolution=64)
    assert d["alignment"]["cramers_v"] < 0.2
    assert d["alignment"]["warning"] is None
    assert d["probe"]["auc"] < 0.7, d["probe"]
    assert d["probe"]["predictable"] is False
    assert d["warning"] is None and d["warnings"] == []


def test_source_probe_edge_cases() -> None:
    imgs = np.zeros((6, 16, 16), np.uint8)
    one = source_probe(imgs, ["a"] * 6)
    assert one["auc"] is None and "only one source" in one["note"]
    few = source_probe(imgs, ["a", "a", "a", "b", "b", "b"], ["p1"] * 3 + ["p2"] * 3)
    assert few["auc"] is None and "fewer than 2 patients" in few["note"]
    with pytest.raises(ConfigError, match="one entry per image"):
        source_probe(imgs, ["a", "b"])
    # a recognisable source with labels spread evenly over sources is no shortcut
    quiet = shortcut_warning(
        {"predictable": True, "auc": 0.99, "size": 32},
        {"cramers_v": 0.05, "confounded_classes": []},
    )
    assert quiet is None
    loud = shortcut_warning(
        {"predictable": True, "auc": 0.99, "size": 32}, {"cramers_v": 0.8, "confounded_classes": []}
    )
    assert loud and "ROC-AUC 0.99" in loud


# ----------------------------------------------------------------------------- blanking


def test_blank_center_blanks_the_centre_and_keeps_the_border() -> None:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(3, 50, 40), dtype=np.uint8)
    out = blank_center(imgs, 0.6, "mean")
    top, bottom, left, right = blank_box(50, 40, 0.6)
    assert (top, bottom, left, right) == (10, 40, 8, 32)
    for i in range(3):
        centre = out[i, top:bottom, left:right]
        assert np.all(centre == np.rint(imgs[i].mean()))
        border = np.ones((50, 40), bool)
        border[top:bottom, left:right] = False
        assert np.array_equal(out[i][border], imgs[i][border])
    assert not np.shares_memory(out, imgs)
    single = blank_center(imgs[0], 0.5, "zero")
    assert single.shape == (50, 40) and np.all(single[12:37, 10:30] == 0)
    assert np.all(blank_center(imgs[0], 0.5, 7)[12:37, 10:30] == 7)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="fraction"):
            blank_center(imgs, bad)
    with pytest.raises(ConfigError, match="fill"):
        blank_center(imgs, 0.5, "noise")


def test_blanked_dataset_is_a_separate_view(smoke_study: Path, prepared_dir: Path) -> None:
    ds = load_dataset("three_class", prepared_dir).subset(range(10), tag="t")
    b = blanked_dataset(ds, 0.6, "zero")
    assert b.hash != ds.hash and len(b) == len(ds)
    assert b.meta["control"]["of"] == ds.hash
    x, y = np.asarray(ds.images(64)), b.images(64)
    top, bottom, left, right = blank_box(64, 64, 0.6)
    assert np.all(y[:, top:bottom, left:right] == 0)
    assert np.array_equal(y[:, :top], x[:, :top]) and np.array_equal(y[:, bottom:], x[:, bottom:])
    assert not np.all(x[:, top:bottom, left:right] == 0)  # the parent is untouched


def test_control_verdicts() -> None:
    chance = 1 / 3

    def s(mean, lo=None, hi=None):
        return {
            "mean": mean,
            "ci_low": lo if lo is not None else mean - 0.02,
            "ci_high": hi if hi is not None else mean + 0.02,
        }

    v, msg = control_verdict(s(0.95), s(0.93), chance)
    assert v == "likely_shortcut" and "still scores 0.930" in msg and "likely shortcut" in msg
    v, msg = control_verdict(s(0.95), s(0.34, 0.25, 0.43), chance)
    assert v == "lungs_matter" and "depends on the lung field" in msg
    v, _ = control_verdict(s(0.95), s(0.60), chance)
    assert v == "partial"
    v, msg = control_verdict(s(0.38), s(0.40), chance)
    assert v == "inconclusive" and "barely above chance" in msg


# ----------------------------------------------------------------------------- per source


def test_per_source_table_reads_the_trial(smoke_study: Path) -> None:
    from automl_cxr.deploy import open_trial

    spec = open_trial(smoke_study)
    table = per_source_table(spec.metrics["by_source"])
    rows = {r["source"]: r for r in table["rows"]}
    assert set(rows) == {"cohen", "kermany"}
    assert rows["cohen"]["classes_present"] == ["covid"]
    assert rows["cohen"]["auc"] is None  # a single class: no AUC within the source
    assert rows["cohen"]["n"] + rows["kermany"]["n"] == spec.metrics["pooled"]["n"]
    assert "'cohen' holds only 'covid'" in table["note"]


# ----------------------------------------------------------------------------- CLI


def test_diagnose_cli_with_control(smoke_study: Path, prepared_dir: Path, capsys) -> None:
    base = ["diagnose", "--study", str(smoke_study), "--data-dir", str(prepared_dir)]
    assert main([*base, "--control", "--quiet"]) == 0
    cap = capsys.readouterr()
    out = " ".join(cap.out.split())
    assert "source-label alignment: Cramér's V = 1.00" in out
    assert "image-based source probe: ROC-AUC" in out
    assert "out-of-fold metrics per source" in out and "kermany" in out
    assert "lung-blanked control run" in out and "lungs hidden" in out and "verdict:" in out
    assert "predictable from the pixels" in " ".join(cap.err.split())

    assert main([*base, "--json", "--blank-fraction", "0.5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["probe"]["auc"] >= 0.9 and res["warning"]
    assert res["control"] is None
    assert {r["source"] for r in res["by_source"]["rows"]} == {"cohen", "kermany"}


def test_diagnose_cli_errors(smoke_study: Path, prepared_dir: Path, capsys) -> None:
    base = ["diagnose", "--study", str(smoke_study), "--data-dir", str(prepared_dir)]
    assert main([*base, "--trial", "99"]) == 2
    assert "no trial 99" in capsys.readouterr().err
    assert main([*base, "--control", "--blank-fraction", "1.5"]) == 2
    assert "fraction" in capsys.readouterr().err
    assert main(["diagnose", "--study", str(smoke_study.parent / "nope.db")]) == 2
    assert "not found" in capsys.readouterr().err
