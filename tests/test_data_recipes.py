"""Recipes on the real shared X-rays: the paper's unchanged, binary_adult, four_class_mixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automl_cxr.cli import main
from automl_cxr.data import get_recipe, load_dataset, prepare_recipes, read_kermany
from automl_cxr.data._diagnostics import source_label_alignment
from automl_cxr.errors import ConfigError, DataError

# Recorded from `automl-cxr data prepare --sources ../shared/data` BEFORE NIH, Cohen's mapped
# findings and the new recipes were added: adding them must not change what these draw.
# Re-recorded once when the duplicate finder (issue 28) began merging re-framed copies (9 Cohen
# COVID-19 copies, one Kermany pair): a change of the data, not of the recipes.
PAPER = {
    "three_class": (
        "0d0c8ab645ce1742ed7d5c4ea897d898b5394b39f7cdff4a612dc02e77a8d198",
        {"bacterial": 700, "covid": 224, "normal": 487},
    ),
    "four_class": (
        "eaae54ee56e244aa773566ae24a01434505fddff864ed74913e953e8d2a323a7",
        {"bacterial": 357, "covid": 224, "normal": 487, "viral": 357},
    ),
    "binary": (
        "45120af045a16c815d406cfd643340f963c2e967668d215398fa2323345dba20",
        {"covid": 224, "non_covid": 1201},
    ),
}
COHEN_UNCERTAIN = {"todo", "Unknown", "Pneumonia"}


def test_paper_recipes_unchanged_with_nih_in_the_pool(prepared_dir: Path) -> None:
    for name, (digest, classes) in PAPER.items():
        ds = load_dataset(name, prepared_dir)
        assert ds.hash == digest, name
        assert ds.meta["classes"] == classes, name
        assert set(ds.manifest["source"]) == {"cohen", "kermany"}
        assert (ds.manifest[ds.manifest.source == "cohen"]["label"] == "covid").all()


def test_paper_recipes_unchanged_without_nih(tmp_path: Path, shared_data: Path) -> None:
    paths = prepare_recipes(
        cohen=shared_data / "cohen", kermany=shared_data / "kermany", data_dir=tmp_path
    )
    assert sorted(p.name for p in paths) == sorted(PAPER)  # no NIH: the paper's three only
    for name, (digest, classes) in PAPER.items():
        ds = load_dataset(name, tmp_path)
        assert (ds.hash, ds.meta["classes"]) == (digest, classes)


def test_binary_adult(prepared_dir: Path) -> None:
    ds = load_dataset("binary_adult", prepared_dir)
    m = ds.manifest
    assert ds.classes == ["covid", "non_covid"] and ds.positive == "covid"
    assert ds.meta["classes"] == {"covid": 412, "non_covid": 688}
    assert ds.meta["sources"] == {"cohen": 498, "nih": 602}
    assert ds.meta["shortfalls"] == {}
    assert m["age"].dtype == float
    assert not (m["age"] < 18).any() and (m["age_group"] != "child").all()
    covid = m[m.label == "covid"]
    assert (covid["source"] == "cohen").all() and covid["finding"].str.startswith("COVID").all()
    non = m[m.label == "non_covid"]
    assert not non["finding"].str.contains("COVID").any()
    assert not non[non.source == "cohen"]["finding"].isin(COHEN_UNCERTAIN).any()
    nih = non[non.source == "nih"]
    assert len(nih) == 602 and (nih["finding"] == "No Finding").sum() == 98
    assert ds.meta["recipe"]["drawn"] == {
        "cohen:covid": 412,
        "nih:normal": 98,
        "nih:other": 504,
        "cohen:bacterial": 32,
        "cohen:viral": 21,
        "cohen:normal": 13,
        "cohen:other": 20,
    }
    per_key = ds.meta["age_filter"]["per_pool_key"]
    assert per_key["cohen:covid"] == {"left_out_younger": 1, "kept_age_unknown": 122}
    assert per_key["nih:other"] == {"left_out_younger": 17, "kept_age_unknown": 0}
    assert m["age"].isna().sum() == 129  # Cohen's unknown ages, kept (see the recipe notes)
    assert any("COVID-19 image still comes from Cohen" in n for n in ds.meta["recipe"]["notes"])


def test_four_class_mixed(prepared_dir: Path) -> None:
    ds = load_dataset("four_class_mixed", prepared_dir)
    m = ds.manifest
    assert ds.classes == ["covid", "bacterial", "viral", "normal"]
    assert ds.meta["classes"] == {"bacterial": 357, "covid": 224, "normal": 504, "viral": 357}
    assert ds.meta["shortfalls"] == {}
    table = source_label_alignment(m)["contingency"]
    assert table == {
        "cohen": {"bacterial": 32, "covid": 224, "normal": 13, "viral": 21},
        "kermany": {"bacterial": 325, "covid": 0, "normal": 391, "viral": 336},
        "nih": {"bacterial": 0, "covid": 0, "normal": 100, "viral": 0},
    }
    cohen = m[m.source == "cohen"]
    assert set(cohen[cohen.label == "bacterial"]["finding"]) <= {
        "Streptococcus",
        "Klebsiella",
        "E.Coli",
        "Legionella",
        "Mycoplasma Bacterial Pneumonia",
        "Chlamydophila",
        "Bacterial",
    }
    assert set(cohen[cohen.label == "viral"]["finding"]) == {"SARS", "Varicella", "Influenza"}
    assert (m[m.source == "nih"]["finding"] == "No Finding").all()
    # taken by patient: a Kermany patient in a class has all its images of that class there,
    # except at most the one patient cut at each target
    kt = read_kermany(Path(ds.meta["sources_used"]["kermany"])).table
    for lab in ("bacterial", "viral", "normal"):
        have = kt[kt.label == lab].groupby("patient_id").size()
        sel = m[(m.source == "kermany") & (m.label == lab)].groupby("patient_id").size()
        assert sum(n < have[p] for p, n in sel.items()) <= 1, lab


def test_new_recipes_deterministic_and_seed_dependent(tmp_path: Path, shared_data: Path) -> None:
    kw = dict(
        cohen=shared_data / "cohen",
        kermany=shared_data / "kermany",
        nih=shared_data / "nih",
        recipes=["binary_adult", "four_class_mixed"],
        # binary_adult takes every eligible image of the shared copy, so only a smaller
        # target leaves the seed a choice there
        counts={"nih:other": 300},
    )
    prepare_recipes(data_dir=tmp_path / "a", seed=1, **kw)
    prepare_recipes(data_dir=tmp_path / "b", seed=1, **kw)
    prepare_recipes(data_dir=tmp_path / "c", seed=2, **kw)
    for name in ("binary_adult", "four_class_mixed"):
        a, b, c = (load_dataset(name, tmp_path / x) for x in "abc")
        assert a.hash == b.hash, name
        assert a.manifest["path"].tolist() == b.manifest["path"].tolist(), name
        assert a.hash != c.hash, name
        assert a.meta["classes"] == c.meta["classes"], name
    assert load_dataset("binary_adult", tmp_path / "a").meta["classes"]["non_covid"] == 484


def test_count_keys_qualified_and_ambiguous() -> None:
    four = get_recipe("four_class").with_counts({"viral": 100})
    assert four.classes["viral"] == {"kermany:viral": 100}
    mixed = get_recipe("four_class_mixed")
    # a label drawn from two sources: its total, Kermany tops up what Cohen leaves
    assert mixed.with_counts({"viral": 100}).classes["viral"] == {
        "cohen:viral": 21,
        "kermany:viral": 79,
    }
    assert mixed.with_counts({"cohen:viral": 5, "viral": 100}).classes["viral"] == {
        "cohen:viral": 5,
        "kermany:viral": 95,
    }
    with pytest.raises(ConfigError, match="viral=21 must be more than the 21 viral images"):
        mixed.with_counts({"viral": 21})
    assert mixed.with_counts({"kermany:viral": 100}).targets["viral"] == 121
    with pytest.raises(ConfigError, match="at least 1, but got kermany:viral=0"):
        mixed.with_counts({"kermany:viral": 0})
    adult = get_recipe("binary_adult")
    with pytest.raises(ConfigError, match="'normal' is ambiguous.*nih:normal.*cohen:normal"):
        adult.with_counts({"normal": 50})
    assert adult.min_age == 18.0
    assert mixed.with_counts({"covid": 5}).notes == mixed.notes  # notes survive an override


def test_recipe_needing_nih_without_it(tmp_path: Path, shared_data: Path) -> None:
    with pytest.raises(DataError, match="'binary_adult' needs the source\\(s\\) \\['nih'\\]"):
        prepare_recipes(
            cohen=shared_data / "cohen",
            kermany=shared_data / "kermany",
            data_dir=tmp_path,
            recipes=["binary_adult"],
        )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_info_json_sources_cramers_v_ages(prepared_dir: Path, capsys) -> None:
    infos = {}
    for name in ("binary", "binary_adult", "four_class", "four_class_mixed"):
        assert main(["data", "info", name, "--data-dir", str(prepared_dir), "--json"]) == 0
        infos[name] = json.loads(capsys.readouterr().out)
    adult, binary = infos["binary_adult"], infos["binary"]
    assert "nih" in adult["sources"]
    assert adult["cramers_v"] < binary["cramers_v"]
    assert binary["cramers_v"] == 1.0 and infos["four_class"]["cramers_v"] == 1.0
    assert 0.8 < adult["cramers_v"] < 0.9
    assert 0.6 < infos["four_class_mixed"]["cramers_v"] < 0.7
    assert adult["source_label_table"] == {
        "cohen": {"covid": 412, "non_covid": 86},
        "nih": {"covid": 0, "non_covid": 602},
    }
    ages = adult["age_by_class"]
    assert set(ages) == {"covid", "non_covid"}
    assert ages["covid"]["images"] == 412 and ages["covid"]["age_known"] == 290
    assert ages["non_covid"]["children"] == 0 and ages["non_covid"]["share_children"] == 0.0
    assert ages["non_covid"]["min"] >= 18 and ages["non_covid"]["q1"] <= ages["non_covid"]["q3"]
    # the paper's non-COVID classes are all children (Kermany: ages not published)
    kids = binary["age_by_class"]["non_covid"]
    assert kids["share_children"] == 1.0 and kids["age_known"] == 0 and kids["median"] is None
    assert sum(v for s in adult["sites"].values() for v in s.values()) == adult["images"]
    assert adult["sites"]["nih"] == {"non_covid": 602}
    assert all(s == "nih" or s.startswith("cohen:") for s in adult["sites"])
    assert adult["patients_at_several_sites"]["count"] == 2
    assert adult["cohen_findings"]["todo"] == {"label": "uncertain", "images": 50}
    assert adult["pool_labels"]["nih"] == {"normal": 100, "other": 521}
    # every prepared dataset at once
    assert main(["data", "info", "--data-dir", str(prepared_dir), "--json"]) == 0
    every = {d["dataset"]: d["cramers_v"] for d in json.loads(capsys.readouterr().out)}
    assert set(every) >= {"binary", "binary_adult", "four_class", "four_class_mixed"}
    assert every["binary_adult"] == adult["cramers_v"]


def test_info_text_shows_table_v_and_ages(prepared_dir: Path, capsys) -> None:
    assert main(["data", "info", "four_class_mixed", "--data-dir", str(prepared_dir)]) == 0
    out = capsys.readouterr().out
    assert "Cramér's V 0.65" in out and "age per class" in out
    assert "uncertain 61" in out and "COVID-19 image still comes from Cohen" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--count", "normal=50", "--recipe", "binary_adult"], "'normal' is ambiguous"),
        (["--count", "viral=10"], "viral=10 must be more than the 21 viral images"),
        (["--count", "kermany:viral=lots"], "whole number of images, but got kermany:viral=lots"),
        (["--count", "fungal=3"], "count key(s) ['fungal'] name no pool"),
        (["--count", "kermany:viral=0"], "at least 1, but got kermany:viral=0"),
    ],
)
def test_cli_prepare_bad_input(
    tmp_path: Path, shared_data: Path, capsys, extra: list[str], message: str
) -> None:
    argv = ["data", "prepare", "--sources", str(shared_data), "--data-dir", str(tmp_path), "-q"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*/dataset.json"))  # refused before any work


def test_cli_prepare_nih_folder_wrong(tmp_path: Path, shared_data: Path, capsys) -> None:
    argv = ["data", "prepare", "--cohen", str(shared_data / "cohen"), "--nih", str(tmp_path)]
    assert main(argv + ["--data-dir", str(tmp_path / "d"), "-q"]) == 2
    assert "NIH ChestX-ray14 metadata not found" in capsys.readouterr().err
    argv = ["data", "prepare", "--cohen", str(shared_data / "cohen"), "--recipe", "binary_adult"]
    assert main(argv + ["--data-dir", str(tmp_path / "d"), "-q"]) == 2
    assert "needs the source(s) ['nih']" in capsys.readouterr().err


def test_cli_count_by_label_applies_to_every_recipe(
    tmp_path: Path, shared_data: Path, capsys
) -> None:
    argv = ["data", "prepare", "--sources", str(shared_data), "--data-dir", str(tmp_path)]
    assert main(argv + ["--count", "viral=400", "-q"]) == 0
    # with -q (or piped) the run prints one line; a --count target not met is a warning
    cap = capsys.readouterr()
    assert "shortfall cohen:viral: target 400, only 21 available (--count)" in cap.err
    assert cap.out.count("\n") == 1 and cap.out.startswith("prepared 5 dataset(s) in")
    assert load_dataset("four_class", tmp_path).meta["classes"]["viral"] == 400
    mixed = load_dataset("four_class_mixed", tmp_path).meta
    assert mixed["classes"]["viral"] == 400
    assert mixed["recipe"]["drawn"]["kermany:viral"] == 379
    assert load_dataset("three_class", tmp_path).hash == PAPER["three_class"][0]
