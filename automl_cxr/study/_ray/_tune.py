"""`--backend ray`: trials in parallel through Ray Tune, with the Optuna study as the one record.

Design (why not Ray's `OptunaSearch`: it wants a storage object rather than a URL, records
trials stopped by a Tune scheduler as COMPLETE, writes no user attributes and has no heartbeat):

Modules: this one starts Ray and the Tune run; `_driver` (the searcher: ask and tell);
`_worker` (one trial in a Ray worker); `_schedulers` (`--scheduler`).

* The driver owns the Optuna study. `AskTellSearcher.suggest()` (called by Tune whenever a
  slot frees up) does `study.ask()` and samples the configuration in the driver with the same
  `Objective.sample` as the local backend, so one sampler sees every earlier trial. The Tune
  config carries only the Optuna trial id; the parameters live in the storage.
* A Ray worker (`_worker.trainable`) opens the same storage by URL, rebuilds the real
  `optuna.trial.Trial` (re-running `Objective.sample` returns the stored values) and runs
  `Objective.run_plan`, so intermediate values, `trial.should_prune()` and every user
  attribute are written exactly as locally. Each intermediate value is also reported to Tune
  (metric `value`, time attribute `step` = Optuna's step) so Tune's schedulers can stop trials.
  The worker never changes the trial's state: its last Tune report carries the outcome.
* `AskTellSearcher.on_trial_complete()` tells Optuna the state: the worker's outcome
  (COMPLETE with values, PRUNED by Optuna's pruner, FAIL with `fail_reason`); a trial stopped
  by the Tune scheduler → PRUNED (`pruned_by` = the scheduler); a Ray worker that died (or its
  node) → FAIL. As locally, dead-worker and transient failures are re-run with the same
  parameters (`_recovery.enqueue_retry`, at most twice): the driver's next ask takes them.
  A worker's setup fault (data missing on its node, the study out of its reach, an import
  error there) is reported as that (`fail_kind` "setup"), not as a dead worker.
* Heartbeats: the driver records one for each of its live trials (also those queued for
  resources) and each worker runs Optuna's heartbeat thread while it trains; `worker` and
  `process` are recorded like the local backend's, so `reconcile_dead_trials` applies.
* Storage: a SQLite or journal file is refused on a multi-node cluster before any trial.
* Logs: Ray's and Tune's own messages go to a log file (`ray_log_path`) unless `--verbose`.
* Placement: `--cpus-per-trial` / `--gpus-per-trial` (fractions share a GPU) become Tune
  resources; the worker records them, its GPU ids and node in `ray_resources`, and trains on
  the GPU Ray assigned, or on the CPU when CUDA is not available (logical GPUs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna

from automl_cxr._storage import storage_url
from automl_cxr.data import PreparedDataset
from automl_cxr.errors import ConfigError
from automl_cxr.study._objective import Objective
from automl_cxr.study._optuna import FINISHED
from automl_cxr.study._profiles import Profile
from automl_cxr.study._ray._driver import DRIVERS, AskTellSearcher, Driver
from automl_cxr.study._ray._schedulers import RecordingFIFO, make_scheduler, max_steps
from automl_cxr.study._ray._worker import Job, trainable
from automl_cxr.study._settings import SearchSettings
from automl_cxr.study._space import SearchSpace

__all__ = ["ray_log_path", "run_ray"]


def run_ray(
    settings: SearchSettings,
    study: optuna.Study,
    dataset: PreparedDataset,
    space: SearchSpace,
    profile: Profile,
    storage_arg: str,
    *,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    log: Callable[[str], None] | None = None,
    externals: Sequence[PreparedDataset] = (),
    test: PreparedDataset | None = None,
) -> None:
    """Run trials through Ray Tune until `study` holds `settings.trials` finished trials.

    Uses the Ray instance the caller initialised, else connects to `settings.address`, else
    starts a local one (and shuts down only what it started or connected to).
    """
    import ray
    from ray import tune

    scheduler = make_scheduler(settings.scheduler, settings, profile, space) or RecordingFIFO()
    ray_log = None if settings.verbose else ray_log_path(study.study_name)
    started = _init_ray(settings.address, log_file=ray_log)
    tmp = tempfile.mkdtemp(prefix="automl-cxr-tune-")
    driver: Driver | None = None
    key = f"{os.getpid()}-{id(study)}-{time.time_ns()}"
    try:
        _check_reach(storage_url(storage_arg))
        cpus, gpus = _trial_resources(
            settings, own_instance=started and not settings.address, log=log
        )
        job = Job(
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
            max_resource=max_steps(profile, space),
            cpus=cpus,
            gpus=gpus,
            feature_cache_bytes=max(0, settings.feature_cache_bytes // settings.workers),
            feature_cache_dir=(
                str(Path(settings.feature_cache_dir).resolve())
                if settings.feature_cache_dir
                else None
            ),
            cwd=os.getcwd(),
            cv=settings.cv,
            externals=tuple((e.name, str(e.root.parent.resolve())) for e in externals),
            test=settings.test,
            trial_timeout=settings.trial_timeout,
        )
        objective = Objective(
            dataset, space, profile, metrics=settings.objectives, seed=settings.seed,
            cv=settings.cv, externals=externals, test=test,
        )  # fmt: skip
        target = settings.trials
        driver = Driver(
            study,
            objective,
            target=target,
            finished_states=FINISHED,
            timeout=settings.timeout,
            on_trial=on_trial,
            stopped=scheduler.stopped,
            scheduler_name=settings.scheduler,
            trial_timeout=settings.trial_timeout,
        )
        driver.errors = scheduler.errors
        if log:
            res = ray.cluster_resources()
            log(
                f"Ray: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; each trial gets "
                f"{cpus} CPU, {gpus:g} GPU; up to {settings.workers} at once"
                + (f"; scheduler {settings.scheduler}" if settings.scheduler else "")
            )
        runnable = tune.with_resources(
            tune.with_parameters(trainable, job=job), {"cpu": cpus, "gpu": gpus}
        )
        tuner = tune.Tuner(
            runnable,
            tune_config=tune.TuneConfig(
                search_alg=AskTellSearcher(key),
                scheduler=scheduler,
                num_samples=-1,  # the searcher says when the study is done
                max_concurrent_trials=settings.workers,
                # Reusing a worker keeps its dataset and feature cache warm. Not with a
                # scheduler: a stopped function trainable's thread runs on to its next report,
                # Tune's reset then times out and errors the *next* trial without telling the
                # searcher (Ray 2.x), which would leave a slot taken forever.
                reuse_actors=settings.scheduler in (None, "fifo"),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=_safe_name(study.study_name),
                storage_path=tmp,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        DRIVERS[key] = driver
        if log and ray_log is not None:
            log(f"Ray's own messages go to {ray_log} (--verbose shows them here)")
        with driver.heartbeats(), _tune_env(), _ray_logs_to(ray_log), _core_to(ray_log):
            tuner.fit()
    finally:
        DRIVERS.pop(key, None)
        if driver is not None:
            driver.close_unfinished()
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()
    if driver is not None:
        driver.raise_if_failed()


def _init_ray(address: str | None, *, log_file: Path | None = None) -> bool:
    """Initialise Ray unless the caller did; True when this call started/connected it.

    With `log_file` (no `--verbose`), what Ray's C++ core prints while connecting (e.g. a
    retry line per second against a cluster that rejects our token) goes there too."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    verbose = log_file is None
    try:
        with _stderr_to(log_file):
            ray.init(
                address=address or None,
                include_dashboard=False,
                ignore_reinit_error=True,
                log_to_driver=verbose,  # the workers' output: Ray's log files unless --verbose
                logging_level=logging.INFO if verbose else logging.ERROR,
            )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        said = str(exc).lower()
        if log_file is not None and log_file.is_file():
            said += log_file.read_text(errors="replace")[-20000:].lower()
        hint = ""
        if address and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = (
                "; the cluster rejected this process's (missing) token"
                if "authentication token" in said or "unauthenticated" in said
                else "; if the cluster uses token authentication (Ray's default since 2.59)"
            ) + (
                ": set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=FILE (the head's "
                "~/.ray/auth_token); see the README's 'Running on a cluster'"
            )
        elif log_file is not None:
            hint = f" (Ray's messages: {log_file})"
        raise ConfigError(f"cannot start or reach {where}: {msg}{hint}") from None
    return True


@contextlib.contextmanager
def _stderr_to(path: Path | None) -> Iterator[None]:
    """File descriptor 2 (where Ray's C++ core writes) appended to `path`; None: unchanged."""
    if path is None:
        yield
        return
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _core_to(path: Path | None) -> Iterator[None]:
    """While Tune runs: what Ray's C++ core writes to file descriptor 2 (e.g. the "(raylet)
    Raylet is terminated" block when a node dies) is appended to `path`, while Python's
    `sys.stderr` (this search's own lines, warnings) stays on the console. None: unchanged."""
    if path is None:
        yield
        return
    import sys

    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    before = sys.stderr
    sys.stderr = console
    try:
        with _stderr_to(path):
            yield
    finally:
        sys.stderr = before
        console.close()


def ray_log_path(study_name: str) -> Path:
    """Where a search's Ray and Tune messages go unless `--verbose`."""
    folder = Path(tempfile.gettempdir()) / "automl-cxr"
    return folder / f"ray-{_safe_name(study_name)}-{os.getpid()}.log"


@contextlib.contextmanager
def _ray_logs_to(path: Path | None) -> Iterator[None]:
    """Ray's and Tune's Python log records (a trial's traceback when its worker dies, "Trials
    did not complete", ...) go to `path` instead of the console; None leaves them there."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    names = ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]
    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate, logger.level)
        logger.handlers = [handler] if name == "ray" else []
        logger.propagate = name != "ray"
    logging.getLogger("ray").setLevel(logging.INFO)
    try:
        yield
    finally:
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        handler.close()


def _check_reach(url: str) -> None:
    """Refuse, before any trial starts, a storage the other nodes of the cluster cannot reach
    (a SQLite or journal file on this machine)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and url.startswith(("sqlite:", "journal:")):
        raise ConfigError(
            f"the study's storage {url!r} is a file on this machine, which trials on the other "
            f"{len(nodes) - 1} node(s) of the Ray cluster cannot reach: use a database server "
            "every node can reach, e.g. --storage postgresql://USER@HOST/DB (pip install "
            "'automl-cxr[postgres]') or mysql://USER@HOST/DB"
        )


def _trial_resources(
    settings: SearchSettings, *, own_instance: bool, log: Callable[[str], None] | None
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
