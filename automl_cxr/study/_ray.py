"""`--backend ray`: trials in parallel through Ray Tune, with the Optuna study as the one record.

Design (why not Ray's `OptunaSearch`: it wants a storage object rather than a URL, records
trials stopped by a Tune scheduler as COMPLETE, writes no user attributes and has no heartbeat):

* The driver owns the Optuna study. `_AskTellSearcher.suggest()` (called by Tune whenever a
  slot frees up) does `study.ask()` and samples the configuration in the driver with the same
  `Objective.sample` as the local backend, so one sampler sees every earlier trial. The Tune
  config carries only the Optuna trial id; the parameters live in the storage.
* A Ray worker (`_trainable`) opens the same storage by URL, rebuilds the real
  `optuna.trial.Trial` (re-running `Objective.sample` returns the stored values) and runs
  `Objective.run_plan`, so intermediate values, `trial.should_prune()` and every user
  attribute are written exactly as locally. Each intermediate value is also reported to Tune
  (metric `value`, time attribute `step` = Optuna's step) so Tune's schedulers can stop trials.
  The worker never changes the trial's state: its last Tune report carries the outcome.
* `_AskTellSearcher.on_trial_complete()` tells Optuna the state: the worker's outcome
  (COMPLETE with values, PRUNED by Optuna's pruner, FAIL with `fail_reason`); a trial stopped
  by the Tune scheduler → PRUNED (`pruned_by` = the scheduler); a Ray worker that died → FAIL.
* Heartbeats: the driver records one for each of its live trials (also those queued for
  resources) and each worker runs Optuna's heartbeat thread while it trains; `worker` =
  {host, pid} is recorded like the local backend's, so `reconcile_dead_trials` applies.
* Placement: `--cpus-per-trial` / `--gpus-per-trial` (fractions share a GPU) become Tune
  resources; the worker records them, its GPU ids and node in `ray_resources`, and trains on
  the GPU Ray assigned, or on the CPU when CUDA is not available (logical GPUs).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from automl_cxr.errors import AutomlCxrError, ConfigError, StorageError
from automl_cxr.study._objective import Objective, subsample
from automl_cxr.study._profiles import Profile
from automl_cxr.study._space import SearchSpace
from automl_cxr.study._storage import HEARTBEAT_INTERVAL, open_storage, storage_url

__all__ = ["METRIC", "SCHEDULERS", "STEP", "make_scheduler", "run_ray"]

METRIC = "value"
"""What trials report to Tune: the validation value of the study's (first) metric."""
STEP = "step"
"""Tune's time attribute for schedulers: Optuna's step (fold * epochs + epoch, from 0)."""
SCHEDULERS = ("asha", "fifo")
"""`--scheduler` values: `asha` stops weak trials early; `fifo` (or none) never stops one."""

_FINAL = "final"
_MAX_FAILED_IN_A_ROW = 5


# -- driver ----------------------------------------------------------------------------------
def run_ray(
    settings: Any,
    study: optuna.Study,
    dataset: Any,
    space: SearchSpace,
    profile: Profile,
    storage_arg: str,
    *,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Run trials through Ray Tune until `study` holds `settings.trials` finished trials.

    Uses the Ray instance the caller initialised, else connects to `settings.address`, else
    starts a local one (and shuts down only what it started or connected to).
    """
    import ray
    from ray import tune

    from automl_cxr.study._runner import FINISHED

    scheduler = make_scheduler(settings.scheduler, settings, profile, space)
    started = _init_ray(settings.address)
    tmp = tempfile.mkdtemp(prefix="automl-cxr-tune-")
    driver: _Driver | None = None
    key = f"{os.getpid()}-{id(study)}-{time.time_ns()}"
    try:
        cpus, gpus = _trial_resources(
            settings, own_instance=started and not settings.address, log=log
        )
        job = _Job(
            storage_url=storage_url(storage_arg),
            study_name=study.study_name,
            dataset=dataset.name,
            dataset_hash=dataset.hash,
            data_dir=str(Path(settings.data_dir).resolve()),
            max_per_class=profile.max_per_class,
            seed=settings.seed,
            space=space,
            profile=profile,
            objectives=list(settings.objectives),
            pruner=settings.pruner,
            max_resource=max(1, profile.epochs * (profile.max_folds or profile.n_folds)),
            cpus=cpus,
            gpus=gpus,
            feature_cache_bytes=max(0, settings.feature_cache_bytes // settings.workers),
            feature_cache_dir=(
                str(Path(settings.feature_cache_dir).resolve())
                if settings.feature_cache_dir
                else None
            ),
            cwd=os.getcwd(),
        )
        objective = Objective(
            dataset, space, profile, metrics=settings.objectives, seed=settings.seed
        )
        target = settings.trials
        driver = _Driver(
            study,
            objective,
            target=target,
            finished_states=FINISHED,
            timeout=settings.timeout,
            on_trial=on_trial,
            stopped=scheduler.stopped if scheduler is not None else set(),
            scheduler_name=settings.scheduler,
        )
        if log:
            res = ray.cluster_resources()
            log(
                f"Ray: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; each trial gets "
                f"{cpus} CPU, {gpus:g} GPU; up to {settings.workers} at once"
                + (f"; scheduler {settings.scheduler}" if scheduler is not None else "")
            )
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, job=job), {"cpu": cpus, "gpu": gpus}
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_AskTellSearcher(key),
                scheduler=scheduler,
                num_samples=-1,  # the searcher says when the study is done
                max_concurrent_trials=settings.workers,
                # Reusing a worker keeps its dataset and feature cache warm. Not with a
                # scheduler: a stopped function trainable's thread runs on to its next report,
                # Tune's reset then times out and errors the *next* trial without telling the
                # searcher (Ray 2.x), which would leave a slot taken forever.
                reuse_actors=scheduler is None,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=_safe_name(study.study_name),
                storage_path=tmp,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        _DRIVERS[key] = driver
        with driver.heartbeats(), _tune_env():
            tuner.fit()
    finally:
        _DRIVERS.pop(key, None)
        if driver is not None:
            driver.close_unfinished()
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()
    if driver is not None:
        driver.raise_if_failed()


def make_scheduler(name: str | None, settings: Any, profile: Profile, space: SearchSpace):
    """The Tune scheduler for `--scheduler` (None for FIFO), validated before Ray starts."""
    if name is None or name == "fifo":
        return None
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    if len(settings.objectives) > 1:
        raise ConfigError(
            f"scheduler {name!r} needs a single objective (trials report no intermediate "
            f"values in multi-objective studies), but got objectives={settings.objectives}"
        )
    return _RecordingASHA(
        time_attr=STEP,
        metric=METRIC,
        mode="max",
        max_t=max_steps(profile, space),
        grace_period=1,
    )


def max_steps(profile: Profile, space: SearchSpace) -> int:
    """Most intermediate values a trial can report: epochs (the space's largest) × folds."""
    epochs = profile.epochs
    spec = space.train.get("epochs")
    if spec is not None:
        vals = (
            [spec.high]
            if spec.kind in ("int", "float")
            else list(spec.choices)
            if spec.kind == "categorical"
            else [spec.value]
        )
        nums = [int(v) for v in vals if v is not None]
        epochs = max(nums) if nums else epochs
    folds = 1 if profile.holdout else min(profile.n_folds, profile.max_folds or profile.n_folds)
    return max(1, epochs * folds)


def _init_ray(address: str | None) -> bool:
    """Initialise Ray unless the caller did; True when this call started/connected it."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(
            address=address or None,
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot start or reach {where}: {msg}") from None
    return True


def _trial_resources(
    settings: Any, *, own_instance: bool, log: Callable[[str], None] | None
) -> tuple[int, float]:
    """CPUs and GPUs per trial: as asked, else a fair share of the cluster."""
    import ray

    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((r.get("CPU", 0.0) for r in nodes), default=total.get("CPU", 0.0))
    node_gpus = max((r.get("GPU", 0.0) for r in nodes), default=total.get("GPU", 0.0))
    workers = settings.workers
    if settings.cpus_per_trial is not None:
        cpus = int(settings.cpus_per_trial)
    else:
        cpus = max(1, min(int(total.get("CPU", 1) // workers), int(node_cpus) or 1))
    if settings.gpus_per_trial is not None:
        gpus = float(settings.gpus_per_trial)
    elif total.get("GPU", 0) > 0:
        gpus = min(1.0, math.floor(total["GPU"] / workers * 1e4) / 1e4)
    else:
        gpus = 0.0
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(
            f"gpus_per_trial above 1 must be a whole number (Ray's rule), but got {gpus:g}"
        )
    problems = []
    if cpus > node_cpus:
        problems.append(f"{cpus} CPU per trial but the largest Ray node has {node_cpus:g}")
    if gpus > node_gpus:
        problems.append(f"{gpus:g} GPU per trial but the largest Ray node has {node_gpus:g}")
    if problems:
        msg = "; ".join(problems) + " (no trial could ever start)"
        if own_instance:
            raise ConfigError(msg + ": lower --cpus-per-trial/--gpus-per-trial")
        if log:  # an autoscaling cluster may still add such a node
            log(f"warning: {msg}, unless the cluster adds a larger node")
    return cpus, gpus


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "study"


@contextlib.contextmanager
def _tune_env() -> Iterator[None]:
    """While Tune runs here: Ctrl+C raises KeyboardInterrupt (the CLI's resume message) instead
    of Tune's own stop-and-save, and Tune's console output stays off (`verbose=0` alone does
    not silence the new output engine, which prints to stdout)."""
    keys = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_AIR_NEW_OUTPUT": "0"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _now() -> str:
    return datetime.now(UTC).isoformat()


try:  # the classes below subclass Ray's; keep `import automl_cxr.study._ray` cheap otherwise
    from ray.tune.schedulers import AsyncHyperBandScheduler as _ASHA
    from ray.tune.search import Searcher as _Searcher
except ImportError:  # pragma: no cover - ray is a dependency
    _ASHA = object  # type: ignore[assignment,misc]
    _Searcher = object  # type: ignore[assignment,misc]


class _RecordingASHA(_ASHA):
    """ASHA that remembers which trials it stopped (so they become PRUNED, not COMPLETE)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopped: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and not result.get(_FINAL):
            self.stopped.add(trial.trial_id)
        return decision


@dataclass
class _Live:
    trial_id: int
    number: int


_FINISHED = "FINISHED"  # Searcher.FINISHED


class _Driver:
    """The driver's side: asks the Optuna study for each trial and tells it the outcome."""

    def __init__(
        self,
        study: optuna.Study,
        objective: Objective,
        *,
        target: int,
        finished_states: tuple[TrialState, ...],
        timeout: float | None,
        on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None,
        stopped: set[str],
        scheduler_name: str | None,
    ) -> None:
        self.study = study
        self.objective = objective
        self.target = target
        self.finished_states = finished_states
        self.deadline = None if timeout is None else time.time() + timeout
        self.on_trial = on_trial
        self.stopped = stopped
        self.scheduler_name = scheduler_name or "the Tune scheduler"
        self.live: dict[str, _Live] = {}
        self.failed_in_a_row = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    # -- what Tune's Searcher API calls -----------------------------------------------------
    def suggest(self, trial_id: str) -> dict | str | None:
        try:
            return self._suggest(trial_id)
        except Exception as exc:  # a storage error, or on_trial raised: stop starting trials
            if self.error is None:
                self.error = exc
            return _FINISHED if not self.live else None

    def _suggest(self, trial_id: str) -> dict | str | None:
        if self.error is not None or (self.deadline is not None and time.time() >= self.deadline):
            return _FINISHED if not self.live else None
        if self.failed_in_a_row >= _MAX_FAILED_IN_A_ROW:
            self.error = StorageError(
                "every recent trial failed; stopping instead of burning time. Last reason: "
                + self._last_fail_reason()
            )
            return _FINISHED if not self.live else None
        self._fail_stale()
        done = len(self.study.get_trials(deepcopy=False, states=self.finished_states))
        if done + len(self.live) >= self.target:
            return _FINISHED if not self.live else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize"
            trial = self.study.ask()
        storage = self.study._storage
        with contextlib.suppress(Exception):
            if optuna.storages._heartbeat.is_heartbeat_enabled(storage):
                storage.record_heartbeat(trial._trial_id)
        # until a Ray worker takes it over, the trial belongs to this (driver) process
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        try:
            self.objective.sample(trial)
        except Exception as exc:  # as Objective.__call__ + study.optimize(catch=...) locally
            reason = (
                f"invalid configuration: {exc}"
                if isinstance(exc, AutomlCxrError)
                else f"{type(exc).__name__}: {exc}"
            )
            trial.set_user_attr("fail_reason", reason)
            self._tell(trial.number, state=TrialState.FAIL)
            self._after(trial._trial_id)
            return None  # Tune asks again at once
        with self._lock:
            self.live[trial_id] = _Live(trial._trial_id, trial.number)
        return {
            "optuna_trial_id": trial._trial_id,
            "optuna_number": trial.number,
            "params": dict(trial.params),
        }

    def on_trial_complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        with self._lock:
            live = self.live.pop(trial_id, None)
        if live is None:
            return
        try:
            self._finish(trial_id, live, result or {}, error)
        except Exception as exc:  # never let a storage hiccup kill the Tune loop
            if self.error is None:
                self.error = exc

    # -- outcome --------------------------------------------------------------------------
    def _finish(self, tune_id: str, live: _Live, result: dict, error: bool) -> None:
        storage = self.study._storage
        frozen = storage.get_trial(live.trial_id)
        if not frozen.state.is_finished():
            if result.get(_FINAL):
                state = TrialState[str(result.get("optuna_state", "FAIL"))]
                values = result.get("optuna_values")
                if state == TrialState.COMPLETE:
                    self._tell(live.number, values=list(values))
                else:
                    self._tell(live.number, state=state)
            elif error:
                if not frozen.user_attrs.get("fail_reason"):
                    self._set_attr(
                        live.trial_id,
                        "fail_reason",
                        "the Ray worker running this trial died (out of host memory, a crash, "
                        "or a lost node); see the Ray logs",
                    )
                self._tell(live.number, state=TrialState.FAIL)
            elif tune_id in self.stopped:
                step = result.get(STEP, frozen.last_step)
                self._set_attr(live.trial_id, "fail_reason", None)
                self._set_attr(live.trial_id, "pruned_by", self.scheduler_name)
                if step is not None:
                    self._set_attr(live.trial_id, "pruned_at_step", int(step))
                self._tell(live.number, state=TrialState.PRUNED)
            else:
                self._set_attr(
                    live.trial_id, "fail_reason", "Ray Tune stopped this trial before it finished"
                )
                self._tell(live.number, state=TrialState.FAIL)
        self._after(live.trial_id)

    def _after(self, trial_id: int) -> None:
        final = self.study._storage.get_trial(trial_id)
        self.failed_in_a_row = self.failed_in_a_row + 1 if final.state == TrialState.FAIL else 0
        if self.on_trial is not None:
            self.on_trial(self.study, final)

    def _tell(
        self, number: int, *, values: list | None = None, state: TrialState | None = None
    ) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. NaN values: Optuna records FAIL, as locally
            self.study.tell(number, values, state=state, skip_if_finished=True)

    def _set_attr(self, trial_id: int, key: str, value: Any) -> None:
        with contextlib.suppress(UpdateFinishedTrialError):
            self.study._storage.set_trial_user_attr(trial_id, key, value)

    def _fail_stale(self) -> None:
        from optuna.storages._heartbeat import is_heartbeat_enabled

        if not is_heartbeat_enabled(self.study._storage):
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            optuna.storages.fail_stale_trials(self.study)

    def _last_fail_reason(self) -> str:
        for t in reversed(self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))):
            if t.user_attrs.get("fail_reason"):
                return str(t.user_attrs["fail_reason"])
        return "unknown"

    # -- around the Tune run --------------------------------------------------------------
    @contextlib.contextmanager
    def heartbeats(self) -> Iterator[None]:
        """Heartbeats for this driver's live trials, queued ones included (a queued trial has
        no worker yet, and another process's `fail_stale_trials` must not fail it)."""
        from optuna.storages._heartbeat import is_heartbeat_enabled

        storage = self.study._storage
        if not is_heartbeat_enabled(storage):
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_INTERVAL / 2):
                with self._lock:
                    ids = [lv.trial_id for lv in self.live.values()]
                for tid in ids:
                    with contextlib.suppress(Exception):
                        storage.record_heartbeat(tid)

        thread = threading.Thread(target=beat, name="automl-cxr-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def close_unfinished(self) -> None:
        """Trials still RUNNING after Tune returned (interrupted, Tune error) → FAIL."""
        with self._lock:
            live, self.live = list(self.live.values()), {}
        for lv in live:
            with contextlib.suppress(Exception):
                t = self.study._storage.get_trial(lv.trial_id)
                if not t.state.is_finished():
                    self._set_attr(
                        lv.trial_id,
                        "fail_reason",
                        "interrupted: the search stopped while this trial ran",
                    )
                    self._tell(lv.number, state=TrialState.FAIL)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


_DRIVERS: dict[str, _Driver] = {}
"""Live drivers by key: Tune pickles (and may copy) its searcher; the study stays here."""


class _AskTellSearcher(_Searcher):
    """Tune's view of a `_Driver`: a picklable handle (the driver holds a study, locks and
    callbacks, none of which pickle)."""

    def __init__(self, key: str) -> None:
        super().__init__(metric=METRIC, mode="max")
        self.key = key

    def suggest(self, trial_id: str) -> dict | str | None:
        driver = _DRIVERS.get(self.key)
        return self.FINISHED if driver is None else driver.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        driver = _DRIVERS.get(self.key)
        if driver is not None:
            driver.on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        pass  # nothing to save: the Optuna study is the record, and it resumes by itself

    def restore(self, checkpoint_path: str) -> None:
        pass


# -- worker ----------------------------------------------------------------------------------
@dataclass
class _Job:
    """What a Ray worker needs besides the trial id (shipped once through the object store)."""

    storage_url: str
    study_name: str
    dataset: str
    dataset_hash: str
    data_dir: str
    max_per_class: int | None
    seed: int
    space: SearchSpace
    profile: Profile
    objectives: list[str]
    pruner: str
    max_resource: int
    cpus: int
    gpus: float
    feature_cache_bytes: int
    feature_cache_dir: str | None
    cwd: str


class _Abandoned(BaseException):
    """The driver finished this trial (e.g. the Tune scheduler stopped it): unwind quietly.

    A BaseException so that the Objective's `except Exception` writes nothing more."""


class _TuneTrial(optuna.trial.Trial):
    """The real, storage-backed Optuna trial; each intermediate value also goes to Tune."""

    def report(self, value: float, step: int) -> None:
        from ray import tune

        try:
            super().report(value, step)
        except UpdateFinishedTrialError:
            raise _Abandoned() from None
        self.last_reported_step = int(step)
        tune.report({METRIC: float(value), STEP: int(step), _FINAL: False})

    def set_user_attr(self, key: str, value: Any) -> None:
        try:
            super().set_user_attr(key, value)
        except UpdateFinishedTrialError:
            raise _Abandoned() from None


_PROCESS: dict[str, Any] = {}
"""Per worker process (actors are reused): the loaded dataset and the feature cache."""


def _worker_dataset(job: _Job):
    from automl_cxr.data import load_dataset

    key = f"{job.data_dir}|{job.dataset}|{job.max_per_class}|{job.seed}"
    if _PROCESS.get("dataset_key") != key:
        _PROCESS.pop("dataset", None)
        full = load_dataset(job.dataset, Path(job.data_dir))
        _PROCESS["dataset"] = subsample(full, job.max_per_class, job.seed)
        _PROCESS["dataset_key"] = key
    return _PROCESS["dataset"]


def _worker_storage(url: str) -> optuna.storages.BaseStorage:
    if _PROCESS.get("storage_url") != url:
        _PROCESS["storage"] = open_storage(url, create=False)
        _PROCESS["storage_url"] = url
    return _PROCESS["storage"]


def _worker_cache(job: _Job):
    from automl_cxr.engine import FeatureCache

    key = f"{job.feature_cache_bytes}|{job.feature_cache_dir}"
    if _PROCESS.get("cache_key") != key:
        _PROCESS["cache"] = FeatureCache(job.feature_cache_bytes, job.feature_cache_dir)
        _PROCESS["cache_key"] = key
    return _PROCESS["cache"]


def _placement(job: _Job) -> dict:
    import ray
    from ray import tune

    ctx = ray.get_runtime_context()
    try:
        requested = dict(tune.get_context().get_trial_resources().required_resources)
    except Exception:
        requested = {"CPU": job.cpus, "GPU": job.gpus}
    try:
        accel = {k: [str(i) for i in v] for k, v in ctx.get_accelerator_ids().items() if v}
    except Exception:
        accel = {}
    return {
        "cpus": requested.get("CPU", job.cpus),
        "gpus": requested.get("GPU", job.gpus),
        "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "accelerator_ids": accel,
        "node": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "tune_trial_id": tune.get_context().get_trial_id(),
    }


def _trainable(config: dict, job: _Job) -> None:
    """One trial on a Ray worker: the same Objective code path as the local backend."""
    import torch
    from ray import tune

    from automl_cxr.study._objective import _free_device_memory
    from automl_cxr.study._runner import make_pruner

    if os.path.isdir(job.cwd):
        os.chdir(job.cwd)  # Tune starts trials in their own folder; paths behave as locally
    torch.set_num_threads(max(1, int(job.cpus)))
    number = int(config["optuna_number"])
    trial_id = int(config["optuna_trial_id"])
    storage = _worker_storage(job.storage_url)
    study = optuna.load_study(
        study_name=job.study_name,
        storage=storage,
        # the driver sampled every parameter already; this only answers a fixed-value re-ask
        sampler=optuna.samplers.RandomSampler(seed=job.seed + number),
        pruner=make_pruner(job.pruner, job.max_resource),
    )
    trial = _TuneTrial(study, trial_id)
    outcome: dict[str, Any] = {"optuna_state": "FAIL", "optuna_values": None}
    value = float("nan")
    try:
        with optuna.storages._heartbeat.get_heartbeat_thread(trial_id, storage):
            try:
                trial.set_user_attr(
                    "worker", {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
                )
                placement = _placement(job)
                use_cuda = placement["gpus"] > 0 and torch.cuda.is_available()
                placement["device"] = "cuda" if use_cuda else "cpu"
                trial.set_user_attr("ray_resources", placement)
                dataset = _worker_dataset(job)
                if dataset.hash != job.dataset_hash:
                    raise StorageError(
                        f"the Ray worker on {socket.gethostname()} sees dataset {job.dataset!r} "
                        f"with hash {dataset.hash[:12]}, the study has {job.dataset_hash[:12]}: "
                        f"every node needs the same data under {job.data_dir}"
                    )
                objective = Objective(
                    dataset,
                    job.space,
                    job.profile,
                    metrics=job.objectives,
                    seed=job.seed,
                    device=placement["device"],
                    feature_cache=_worker_cache(job),
                )
                plan = objective.sample(trial)  # the driver's values, read back from storage
                values = objective.run_plan(trial, plan)
                vals = list(values) if isinstance(values, tuple) else [values]
                outcome = {"optuna_state": "COMPLETE", "optuna_values": [float(v) for v in vals]}
                value = float(vals[0])
            except optuna.TrialPruned:
                outcome = {"optuna_state": "PRUNED", "optuna_values": None}
            except Exception as exc:  # recorded on the trial; the driver tells FAIL
                if not storage.get_trial(trial_id).user_attrs.get("fail_reason"):
                    trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
                    trial.set_user_attr("fail_traceback", traceback.format_exc()[-4000:])
    except _Abandoned:
        return
    finally:
        _free_device_memory()
    tune.report({METRIC: value, _FINAL: True, **outcome})
