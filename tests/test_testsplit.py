"""`search --test`: a test split drawn before anything else, never seen by the search, scored
after it for the best-by-CV trial and the selected ensemble (report) and for the exported
model (card). Issue 24 §3; real shared X-rays, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from automl_cxr.cli import main
from automl_cxr.data import load_dataset
from automl_cxr.engine import bootstrap_metrics, make_splits
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.oof import load_study_oof
from automl_cxr.report import build_report_data
from automl_cxr.study import SearchSettings, load_study, run_search
from automl_cxr.study._testsplit import parse_test, split_test


def test_parse_test_names_the_bad_value() -> None:
    assert parse_test("site:0.2") == ("site", 0.2)
    assert parse_test("patient:0.25") == ("patient", 0.25)
    for bad in ("site", "hospital:0.2", "site:x", "patient:0", "site:0.7"):
        with pytest.raises(ConfigError, match=repr(bad).replace("(", "\\(")):
            parse_test(bad)


def test_a_hospital_holding_most_of_a_class_is_not_the_holdout() -> None:
    """A group over twice a class's holdout target (NIH: nearly every adult non-COVID film) is
    never moved to the holdout while smaller ones are at hand. The previous splitter always
    took the first shuffled group, so for some seeds the whole hospital left training."""
    labels = np.array(["a"] * 100 + ["b"] * 100)
    groups = np.array(["big"] * 90 + [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(100)])
    for seed in range(30):
        (split,) = make_splits(labels, groups, holdout=0.2, seed=seed)
        held = set(groups[split.val])
        assert "big" not in held, seed
        assert 0 < (labels[split.val] == "a").sum() <= 20


def test_site_split_keeps_nih_in_the_search(prepared_dir: Path) -> None:
    full = load_dataset("binary_adult", prepared_dir)
    search, test, info = split_test(full, "site:0.2", seed=0)
    sites = full.manifest["site"].astype(str)
    in_test = set(test.manifest["site"].astype(str))
    assert not in_test & set(search.manifest["site"].astype(str))  # whole sites
    assert not set(test.groups) & set(search.groups)  # whole patients
    assert info["sites"] == sorted(in_test) and "nih" not in in_test
    nih = int((sites == "nih").sum())
    assert nih > 500 and int((search.manifest["site"] == "nih").sum()) == nih
    assert info["n"] + info["n_search"] == len(full)
    assert set(test.manifest["sha256"]).isdisjoint(search.manifest["sha256"])


@pytest.fixture(scope="module")
def test_study(prepared_dir: Path, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("testsplit") / "t.db"
    run_search(
        SearchSettings(
            dataset="binary_adult",
            trials=3,
            data_dir=prepared_dir,
            storage=str(db),
            profile="smoke",
            cv="site",
            test="site:0.2",
            pruner="none",
        )
    )
    return db


def test_search_never_sees_the_test_split(test_study: Path, prepared_dir: Path) -> None:
    study = load_study(str(test_study))
    info = study.user_attrs["protocol"]["test"]
    full = load_dataset("binary_adult", prepared_dir)
    _, test, _ = split_test(full, "site:0.2", seed=0)
    assert info["hash"] == test.hash and info["spec"] == "site:0.2"
    held = set(test.manifest["sha256"])
    oofs = load_study_oof(study, str(test_study))
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert done and set(oofs) == {t.number for t in done}
    for t in done:
        # no fold trained or validated on a test image ...
        o = oofs[t.number]
        assert o.test is not None and len(o.test.labels) == len(test)
        assert o.test.dataset_hash == test.hash
        # ... and no metric of the test split is recorded on the trial (nothing can rank by it)
        assert not [k for k in t.user_attrs if "test" in k.lower() and k != "oof"]
    ds_rows = {t.user_attrs["dataset_hash"] for t in done}
    assert test.hash not in ds_rows
    search_full = load_dataset("binary_adult", prepared_dir)
    searched = search_full.manifest.loc[
        ~search_full.manifest["sha256"].isin(held), "sha256"
    ].to_numpy()
    assert len(searched) == info["n_search"]


def test_report_and_card_quote_the_test_split(
    test_study: Path, prepared_dir: Path, tmp_path: Path, capsys
) -> None:
    data = build_report_data(load_study(str(test_study)), storage=str(test_study))
    t = data.oof.test
    best = int(data.board["number"].iloc[0])
    assert t["best"]["number"] == best
    o = load_study_oof(load_study(str(test_study)), str(test_study))[best]
    want = bootstrap_metrics(
        o.test.labels, o.test.probs, o.classes, positive="covid", groups=o.test.groups, n_boot=500
    )["metrics"]["balanced_accuracy"]
    assert t["best"]["estimate"] == pytest.approx(want["estimate"])
    assert t["best"]["ci_low"] == pytest.approx(want["ci_low"])
    assert t["best"]["cv"]["mean"] == pytest.approx(
        data.board["value"].iloc[0]
    )  # beside its CV estimate
    assert main(["report", str(test_study), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "Test split (site:0.2" in out and f"Best-by-CV trial {best}" in out
    page = (tmp_path / "rep" / "index.html").read_text()
    assert 'id="test"' in page and "never seen by the search" in page
    assert "## Test split" in (tmp_path / "rep" / "report.md").read_text()
    summary = json.loads((tmp_path / "rep" / "leaderboard.json").read_text())
    assert summary["test"]["best"]["number"] == best
    # the exported model is scored on it too, beside the trial's fold models
    out_dir = tmp_path / "m"
    args = ["export", "--study", str(test_study), "--out", str(out_dir), "--quiet", "--json"]
    assert main([*args, "--data-dir", str(prepared_dir)]) == 0
    card = json.loads((out_dir / "model_card.json").read_text())
    ts = card["test_split"]
    assert ts["spec"] == "site:0.2" and ts["images"] == t["info"]["n"]
    assert ts["trial_fold_models"]["estimate"] == pytest.approx(t["best"]["estimate"])
    assert 0.0 <= ts["exported"]["estimate"] <= 1.0
    assert "## Test split (never seen by the search)" in (out_dir / "model_card.md").read_text()


def test_resume_with_another_test_split_is_refused(test_study: Path, prepared_dir: Path) -> None:
    n = len(load_study(str(test_study)).trials)
    kw = dict(
        dataset="binary_adult",
        trials=n + 1,
        data_dir=prepared_dir,
        storage=str(test_study),
        profile="smoke",
        cv="site",
        pruner="none",
    )
    with pytest.raises(StorageError, match="test: the study's test split is 'site:0.2'"):
        run_search(SearchSettings(**kw, test="patient:0.2"))
    with pytest.raises(StorageError, match="pass --test site:0.2"):
        run_search(SearchSettings(**kw))
    assert len(optuna.load_study(study_name=None, storage=f"sqlite:///{test_study}").trials) == n


def test_bad_test_option_is_a_clear_cli_error(prepared_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["search", "--dataset", "binary_adult", "--trials", "1", "--profile", "smoke"]
    args += ["--data-dir", str(prepared_dir), "--storage", str(tmp_path / "x.db")]
    assert main([*args, "--test", "hospital:0.2"]) == 2
    err = capsys.readouterr().err
    assert "--test must be patient:F or site:F" in err and "'hospital:0.2'" in err
    assert "Traceback" not in err and not (tmp_path / "x.db").exists()


def test_the_search_and_the_report_describe_a_test_split_in_the_same_words() -> None:
    """Issue 25: the runner's console line and the report each wrote what a test split holds;
    one function (`describe_held`) says it for both."""
    from automl_cxr.report._tables import describe_test_split
    from automl_cxr.study import describe_held
    from automl_cxr.study._runner import _test_line

    info = {
        "spec": "site:0.2",
        "seed": 0,
        "n": 148,
        "patients": 120,
        "n_search": 667,
        "classes": {"covid": 60, "non_covid": 88},
        "sites": ["cohen:a", "cohen:b", "cohen:c", "nih"],
    }
    held = describe_held(info)
    assert held == (
        "148 images of 120 patients (covid 60, non_covid 88) from 4 whole sites "
        "(cohen:a, cohen:b, cohen:c, …)"
    )

    class _Data:
        oof = type("O", (), {"test": {"info": info, "note": "no fold models"}})()

    assert held in _test_line(info)
    assert held in describe_test_split(_Data())[0]
