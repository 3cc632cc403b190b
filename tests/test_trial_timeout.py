"""Bounded trials (issue 24 §4): `--trial-timeout` fails a trial that runs longer, with the
reason, locally and on Ray workers (the same engine check); the Ray driver gives up a silent
trial past the limit, and a failure while recording a trial's outcome never leaves it
RUNNING. Each test fails on the code before these changes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from automl_cxr.errors import ConfigError, SearchAborted
from automl_cxr.study import SearchSettings, load_study, run_search
from automl_cxr.study._optuna import FINISHED
from automl_cxr.study._ray import _driver as _ray_driver
from automl_cxr.study._ray._driver import Driver, Live
from automl_cxr.study._ray._worker import FINAL


def test_trial_timeout_fails_the_trial_with_the_reason(prepared_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    settings = SearchSettings(
        dataset="three_class",
        trials=2,
        data_dir=prepared_dir,
        storage=str(db),
        profile="smoke",
        trial_timeout=0.01,
    )
    with pytest.raises(SearchAborted, match="time limit of 0.01 s \\(--trial-timeout\\)"):
        run_search(settings)  # every trial timed out: stopped with the last reason
    trials = load_study(str(db)).trials
    assert trials and all(t.state == TrialState.FAIL for t in trials)
    for t in trials:
        assert "--trial-timeout" in t.user_attrs["fail_reason"]
        assert "0.01 s" in t.user_attrs["fail_reason"]
        assert t.user_attrs["fail_kind"] == "timeout"
        assert "retry_of" not in t.user_attrs  # a slow configuration is not re-run
    with pytest.raises(ConfigError, match="trial_timeout must be a positive number"):
        SearchSettings(dataset="x", trials=1, data_dir=tmp_path, trial_timeout=0)


def _driver(tmp_path: Path) -> tuple[optuna.Study, Driver, Live]:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}")
    driver = Driver(
        study,
        objective=None,
        target=1,
        finished_states=FINISHED,
        timeout=None,
        on_trial=None,
        stopped=set(),
        scheduler_name=None,
    )
    trial = study.ask()
    live = Live(trial._trial_id, trial.number)
    driver.live["tune-1"] = live
    return study, driver, live


def test_a_failure_while_recording_the_outcome_leaves_no_trial_running(
    tmp_path: Path, monkeypatch
) -> None:
    study, driver, live = _driver(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(driver, "_tell", broken)
    outcome = {FINAL: True, "optuna_state": "COMPLETE", "optuna_values": [0.5]}
    driver.on_trial_complete("tune-1", outcome, False)
    t = study.trials[live.number]
    assert t.state == TrialState.FAIL
    assert "could not record this trial's outcome" in t.user_attrs["fail_reason"]
    assert "database went away" in t.user_attrs["fail_reason"]
    assert isinstance(driver.error, RuntimeError)  # and the search stops with it


def test_the_driver_gives_up_a_silent_trial_past_its_limit(tmp_path: Path, monkeypatch) -> None:
    study, driver, live = _driver(tmp_path)
    assert not driver._fail_if_hung(live.trial_id)  # no --trial-timeout: never
    driver.trial_timeout = 3600.0
    assert not driver._fail_if_hung(live.trial_id)  # within the limit
    monkeypatch.setattr(_ray_driver, "HUNG_GRACE", -7200.0)  # as if two hours had passed
    assert driver._fail_if_hung(live.trial_id)
    t = study.trials[live.number]
    assert t.state == TrialState.FAIL and t.user_attrs["fail_kind"] == "timeout"
    assert "--trial-timeout 3600 s" in t.user_attrs["fail_reason"]
