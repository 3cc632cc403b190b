"""Errors that used to be swallowed are said (issue 24 §5): a damaged out-of-fold artifact
(not treated as a missing one), saving the predictions failing after a trial trained, the
dashboard publisher's problems, a damaged feature-cache file. Each test fails on the code
before the change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from automl_cxr.engine import FeatureCache
from automl_cxr.errors import DataError, StorageError
from automl_cxr.oof import artifact_dir, load_oof, load_study_oof
from automl_cxr.report import build_report_data
from automl_cxr.study import SearchSettings, load_study, run_search


@pytest.fixture
def study_copy(smoke_study: Path, tmp_path: Path) -> Path:
    db = tmp_path / "s.db"
    shutil.copy(smoke_study, db)
    shutil.copytree(artifact_dir(smoke_study), artifact_dir(db))
    return db


def _artifact(study: optuna.Study, db: Path, number: int) -> Path:
    info = study.trials[number].user_attrs["oof"]
    return artifact_dir(db) / info["artifact_id"]


def test_damaged_oof_is_an_error_a_missing_one_is_absent(study_copy: Path) -> None:
    study = load_study(str(study_copy))
    first = study.get_trials(states=(TrialState.COMPLETE,))[0]
    path = _artifact(study, study_copy, first.number)
    path.write_bytes(b"PK\x03\x04 not a zip any more")
    with pytest.raises(DataError, match=f"trial {first.number}: .* are damaged"):
        load_oof(first, str(study_copy))
    problems: list[str] = []
    found = load_study_oof(study, str(study_copy), problems=problems)
    assert first.number not in found and len(problems) == 1 and "damaged" in problems[0]
    data = build_report_data(study, storage=str(study_copy))
    assert any("damaged" in n for n in data.oof.notes)  # the report says so
    path.unlink()  # missing: absent (None), an error only where required
    assert load_oof(first, str(study_copy)) is None
    with pytest.raises(StorageError, match="is missing"):
        load_oof(first, str(study_copy), required=True)


def test_dashboard_publisher_says_what_it_could_not_publish(study_copy: Path) -> None:
    from automl_cxr.report._dashboard import publish_dashboard

    study = load_study(str(study_copy))
    first = study.get_trials(states=(TrialState.COMPLETE,))[0]
    _artifact(study, study_copy, first.number).write_bytes(b"garbage")
    res = publish_dashboard(study, str(study_copy), figures=False)
    assert len(res["published"]) == len(study.get_trials(states=(TrialState.COMPLETE,)))
    assert any(f"trial {first.number}" in p and "damaged" in p for p in res["problems"])


def test_a_trial_whose_predictions_cannot_be_saved_stays_complete(
    prepared_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import automl_cxr.study._objective as objective

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(objective, "save_oof", broken)
    db = tmp_path / "t.db"
    settings = SearchSettings(
        dataset="three_class", trials=1, data_dir=prepared_dir, storage=str(db), profile="smoke"
    )
    run_search(settings)
    (t,) = load_study(str(db)).trials
    assert t.state == TrialState.COMPLETE  # its scores stand
    assert t.user_attrs["oof"] == {
        "stored": False,
        "reason": "saving failed: RuntimeError: disk on fire",
    }


def test_a_damaged_feature_cache_file_is_recomputed_and_said(tmp_path: Path) -> None:
    cache = FeatureCache(directory=tmp_path)
    t, hit = cache.get_or_compute("k", lambda: torch.arange(6.0))
    assert not hit
    # damaged on disk as it happens (a torn copy from elsewhere, a bad disk): a new file in
    # its place; the cache itself only ever writes a new file and renames it
    (tmp_path / "torn").write_bytes(b"torn")
    os.replace(tmp_path / "torn", tmp_path / "k.npy")
    fresh = FeatureCache(directory=tmp_path)
    with pytest.warns(RuntimeWarning, match="damaged"):
        again, hit = fresh.get_or_compute("k", lambda: torch.arange(6.0))
    assert not hit and torch.equal(again, t)
    assert torch.equal(t, torch.arange(6.0))  # the first cache's mapped copy is untouched
    assert len(fresh.discarded) == 1 and fresh.discarded[0].startswith("k.npy: ")
