"""`--backend ray`: Ray Tune runs the trials, the Optuna study stays the one record.

Real chest X-rays (the `prepared_dir` fixture), profile `smoke` (tiny timm test models, 64 px).
Most of the time here is Ray starting and its worker processes importing torch and timm.
"""

from __future__ import annotations

import os
from datetime import datetime

import optuna
import pytest
from optuna.trial import TrialState

from automl_cxr.errors import ConfigError
from automl_cxr.study import FINISHED, SearchSettings, _ray_driver, run_search
from automl_cxr.study import _ray as ray_backend

ray = pytest.importorskip("ray")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULT_KEYS = {
    "accuracy",
    "covid_sensitivity",
    "covid_specificity",
    "macro_f1",
    "auc",
    "metrics",
    "config",
    "params_total",
    "params_trainable",
    "latency_ms",
    "train_seconds",
    "device",
    "worker",
}


def _load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{storage}")


def _window(t: optuna.trial.FrozenTrial) -> tuple[datetime, datetime]:
    """When the Ray worker ran the trial: from its own start stamp to the driver's tell."""
    start = datetime.fromisoformat(t.user_attrs["worker"]["started"])
    end = t.datetime_complete
    return start, end if end.tzinfo else end.astimezone()  # Optuna's naive local time


def test_unknown_scheduler_is_a_config_error_before_ray_starts(prepared_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"'pbt'.*asha"):
        run_search(
            SearchSettings(
                dataset="three_class",
                trials=1,
                data_dir=prepared_dir,
                storage=str(tmp_path / "s.db"),
                profile="smoke",
                backend="ray",
                scheduler="pbt",
            )
        )
    assert not ray.is_initialized()


def test_driver_maps_tune_outcomes_to_optuna_states():
    """Worker outcome → its state; Ray worker death → FAIL; scheduler stop → PRUNED; a stop
    nobody asked for (e.g. interrupted) → FAIL. No Ray needed."""
    study = optuna.create_study(direction="maximize")
    seen = []
    driver = _ray_driver.Driver(
        study,
        None,
        target=9,
        finished_states=FINISHED,
        timeout=None,
        on_trial=lambda s, t: seen.append(t.state),
        stopped={"t2"},
        scheduler_name="asha",
    )
    for i in range(5):
        t = study.ask()
        t.report(0.5, 0)
        driver.live[f"t{i}"] = _ray_driver.Live(t._trial_id, t.number)
    driver.on_trial_complete(
        "t0", {"final": True, "optuna_state": "COMPLETE", "optuna_values": [0.75]}, False
    )
    driver.on_trial_complete("t1", None, True)
    driver.on_trial_complete("t2", {"step": 0, "value": 0.5}, False)
    driver.on_trial_complete("t3", {"step": 0, "value": 0.5}, False)
    driver.on_trial_complete("t4", {"final": True, "optuna_state": "PRUNED"}, False)
    driver.on_trial_complete("t4", None, True)  # a second notice changes nothing
    assert driver.error is None
    t0, t1, t2, t3, t4 = study.get_trials()
    assert (t0.state, t0.value) == (TrialState.COMPLETE, 0.75)
    assert t1.state == TrialState.FAIL and "Ray worker" in t1.user_attrs["fail_reason"]
    assert t2.state == TrialState.PRUNED
    assert t2.user_attrs["pruned_by"] == "asha" and t2.user_attrs["pruned_at_step"] == 0
    assert t3.state == TrialState.FAIL and "stopped" in t3.user_attrs["fail_reason"]
    assert t4.state == TrialState.PRUNED
    assert seen == [t.state for t in (t0, t1, t2, t3, t4)]
    assert not driver.live


def test_asha_needs_one_objective_and_spans_every_step():
    from automl_cxr.study import get_profile, load_space

    profile, space = get_profile("smoke"), load_space(None)
    multi = SearchSettings(
        dataset="three_class",
        trials=1,
        data_dir=".",
        objectives=["accuracy", "latency"],
        backend="ray",
    )
    with pytest.raises(ConfigError, match="single objective"):
        ray_backend.make_scheduler("asha", multi, profile, space)
    single = SearchSettings(dataset="three_class", trials=1, data_dir=".", backend="ray")
    asha = ray_backend.make_scheduler("asha", single, profile, space)
    assert asha._max_t == 4 == ray_backend.max_steps(profile, space)  # 2 folds x 2 epochs
    assert ray_backend.make_scheduler(None, single, profile, space) is None


def test_two_concurrent_trials_keep_the_local_record(prepared_dir, tmp_path):
    assert not ray.is_initialized()
    seen: list[optuna.trial.FrozenTrial] = []
    db = str(tmp_path / "ray.db")
    summary = run_search(
        SearchSettings(
            dataset="three_class",
            trials=3,
            data_dir=prepared_dir,
            storage=db,
            profile="smoke",
            backend="ray",
            workers=2,
        ),
        on_trial=lambda study, t: seen.append(t),
    )
    assert not ray.is_initialized(), "run_ray must shut down the Ray instance it started"

    trials = _load(db, summary.study_name).get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sorted(t.number for t in seen) == sorted(t.number for t in trials)
    assert all(t.state.is_finished() for t in seen)
    for t in finished:
        assert t.params, "parameters are sampled into the study"
        assert t.intermediate_values, f"trial {t.number} has no intermediate values"
        assert t.user_attrs["ray_resources"]["cpus"] >= 1
        assert t.user_attrs["ray_resources"]["device"] == "cpu"
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    assert complete, "at least the first trial to reach each rung completes"
    for t in complete:
        assert set(t.user_attrs) >= RESULT_KEYS, RESULT_KEYS - set(t.user_attrs)
        assert t.value == pytest.approx(t.user_attrs["balanced_accuracy"])
        assert t.user_attrs["fail_reason"] is None
        assert len(t.intermediate_values) == 4  # 2 folds x 2 epochs

    # Two trials ran at the same time, in two Ray worker processes.
    a, b = sorted(finished, key=lambda t: t.number)[:2]
    assert a.user_attrs["worker"]["pid"] != b.user_attrs["worker"]["pid"]
    assert a.user_attrs["worker"]["pid"] != os.getpid()
    (a0, a1), (b0, b1) = _window(a), _window(b)
    assert a0 < b1 and b0 < a1, f"trials 0 and 1 did not overlap: {a0}-{a1} vs {b0}-{b1}"

    # The same user attributes as a local run (plus where Ray placed the trial).
    local_db = str(tmp_path / "local.db")
    local = run_search(
        SearchSettings(
            dataset="three_class",
            trials=1,
            data_dir=prepared_dir,
            storage=local_db,
            profile="smoke",
            pruner="none",
        )
    )
    (lt,) = _load(local_db, local.study_name).get_trials()
    assert lt.state == TrialState.COMPLETE
    for t in complete:
        assert set(t.user_attrs) - set(lt.user_attrs) == {"ray_resources"}
        assert set(lt.user_attrs) <= set(t.user_attrs)
        assert set(t.user_attrs["worker"]) >= set(lt.user_attrs["worker"])


@pytest.fixture(scope="module")
def logical_gpus():
    """One Ray instance declaring 4 GPUs that do not exist (CUDA is absent here)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_fractional_gpus_fall_back_to_cpu_and_asha_stops_become_pruned(
    logical_gpus, prepared_dir, tmp_path, monkeypatch
):
    """Placement on logical GPUs (0.5 each), and a trial stopped by ASHA ends PRUNED.

    ASHA is forced to stop trial 1 at its first report, so the test does not depend on which
    configuration happens to score worse; every other decision is the real ASHA's (trial 0,
    alone at its rung, runs to the end).
    """
    real = ray_backend._RecordingASHA.on_trial_result

    def on_trial_result(self, controller, trial, result):
        if trial.config.get("optuna_number") == 1 and not result.get("final"):
            self.stopped.add(trial.trial_id)
            return self.STOP
        return real(self, controller, trial, result)

    monkeypatch.setattr(ray_backend._RecordingASHA, "on_trial_result", on_trial_result)
    db = str(tmp_path / "gpu.db")
    summary = run_search(
        SearchSettings(
            dataset="three_class",
            trials=2,
            data_dir=prepared_dir,
            storage=db,
            profile="smoke",
            backend="ray",
            workers=2,
            gpus_per_trial=0.5,
            scheduler="asha",
            pruner="none",
        )
    )
    assert ray.is_initialized(), "a Ray instance the caller started stays up"
    assert ray.cluster_resources().get("GPU") == 4

    trials = _load(db, summary.study_name).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    for t in trials:
        placed = t.user_attrs["ray_resources"]
        assert placed["gpus"] == 0.5
        assert placed["gpu_ids"], f"trial {t.number} got no GPU assignment: {placed}"
        assert placed["device"] == "cpu", "no CUDA here: the CPU fallback must be used"
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["device"] == "cpu"
            assert len(t.intermediate_values) == 4
        else:  # only ASHA prunes here (pruner none)
            assert t.user_attrs["pruned_by"] == "asha"
            assert len(t.intermediate_values) < 4
            assert "accuracy" not in t.user_attrs

    stopped = next(t for t in trials if t.number == 1)
    assert stopped.state == TrialState.PRUNED
    assert stopped.user_attrs["pruned_at_step"] == 0
    assert stopped.user_attrs["fail_reason"] is None
