"""The local backend: trials one after another in this process (`study.optimize`, failed ones
retried, Ctrl-C honoured between epochs) or in N worker processes sharing the storage."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from automl_cxr._storage import storage_url
from automl_cxr.data import PreparedDataset
from automl_cxr.errors import SearchAborted, StorageError
from automl_cxr.study._optuna import (
    FINISHED,
    finished_count,
)
from automl_cxr.study._profiles import Profile
from automl_cxr.study._recovery import (
    last_fail_reason,
    reconcile_dead_trials,
    retry_transient,
    too_many_failures,
)
from automl_cxr.study._settings import SearchSettings
from automl_cxr.study._space import SearchSpace

if TYPE_CHECKING:
    from automl_cxr.study._objective import Objective

__all__ = ["SQLITE_WORKERS_HINT", "run_local", "run_workers"]

SQLITE_WORKERS_HINT = 4
"""More local workers than this on one SQLite file: recommend a journal file or PostgreSQL."""


def run_local(
    settings: SearchSettings,
    study: optuna.Study,
    dataset: PreparedDataset,
    space: SearchSpace,
    profile: Profile,
    storage_arg: str,
    name: str,
    *,
    search: Callable[[SearchSettings], object],
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    log: Callable[[str], None] | None = None,
    externals: Sequence[PreparedDataset] = (),
    test: PreparedDataset | None = None,
) -> list[str]:
    """Run the study's missing trials here, or in `settings.workers` processes, each running
    `search` (the runner's `run_search`) on the shared storage; returns the notes to carry
    into the summary (many workers on one SQLite file)."""
    if settings.workers > 1:
        return run_workers(
            settings, study, storage_arg, name, search=search, on_trial=on_trial, log=log
        )
    before = len(study.trials)
    _run_here(settings, study, dataset, space, profile, before, on_trial, list(externals), test)
    return []


def run_workers(
    settings: SearchSettings,
    study: optuna.Study,
    storage_arg: str,
    name: str,
    *,
    search: Callable[[SearchSettings], object],
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """The study's missing trials in `settings.workers` processes (nothing here imports
    torch); returns the notes to carry into the summary (many workers on one SQLite file)."""
    note = _sqlite_note(settings, storage_arg)
    if note and log:
        log(note)
    _run_local_workers(settings, storage_arg, name, settings.workers, study, on_trial, search)
    return [note] if note else []


def _run_here(
    settings: SearchSettings,
    study: optuna.Study,
    dataset: PreparedDataset,
    space: SearchSpace,
    profile: Profile,
    before: int,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None,
    externals: list[PreparedDataset],
    test: PreparedDataset | None = None,
) -> None:
    """Trials one after another in this process (`study.optimize`), failed ones retried."""
    import torch

    from automl_cxr.engine import FeatureCache
    from automl_cxr.study._objective import Objective  # both import torch: not in a coordinator

    start = time.time()
    if settings.cpus_per_trial:
        torch.set_num_threads(settings.cpus_per_trial)
    objective = Objective(
        dataset,
        space,
        profile,
        metrics=settings.objectives,
        seed=settings.seed,
        feature_cache=FeatureCache(settings.feature_cache_bytes, settings.feature_cache_dir),
        cv=settings.cv,
        externals=externals,
        test=test,
        trial_timeout=settings.trial_timeout,
    )
    stop = objective.stop = threading.Event()
    objective.max_trials = settings.trials

    def stop_check(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if stop.is_set():
            raise KeyboardInterrupt

    callbacks = [
        # finished here or running elsewhere: a worker starts no trial another one will finish
        optuna.study.MaxTrialsCallback(settings.trials, states=(*FINISHED, TrialState.RUNNING)),
        retry_transient,
        stop_check,
    ]
    if on_trial:
        callbacks.append(on_trial)
    with _interrupt_sets(stop):
        _optimize_until_done(settings, study, objective, callbacks, start, before)


@contextlib.contextmanager
def _interrupt_sets(stop: threading.Event):
    """While a search runs in this (main) thread, SIGINT also sets `stop`: KeyboardInterrupt
    is raised at once as usual and, should Python swallow it (one that lands in a finalizer
    is only printed), again at the next epoch report or trial end."""
    previous = signal.getsignal(signal.SIGINT)
    if (
        previous in (signal.SIG_IGN, None)
        or threading.current_thread() is not threading.main_thread()
    ):
        yield  # an ignored SIGINT stays ignored; only the main thread may set a handler
        return

    def handler(signum, frame) -> None:
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _optimize_until_done(
    settings: SearchSettings,
    study: optuna.Study,
    objective: Objective,
    callbacks: list,
    start: float,
    before: int,
) -> None:
    while finished_count(study) < settings.trials:
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        remaining = settings.trials - finished_count(study) - running
        if remaining <= 0:  # other workers' trials fill the study: wait for their outcome
            if settings.timeout is not None and time.time() - start >= settings.timeout:
                break
            if objective.stop is not None and objective.stop.is_set():
                raise KeyboardInterrupt
            reconcile_dead_trials(study)  # a dead worker's trial is re-queued, not awaited
            time.sleep(0.5)
            continue
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=(
                None
                if settings.timeout is None
                else max(1.0, settings.timeout - (time.time() - start))
            ),
            catch=(Exception,),
            callbacks=callbacks,
            gc_after_trial=False,  # CUDA memory: _free_device_memory after each trial
        )
        if settings.timeout is not None and time.time() - start >= settings.timeout:
            break
        if too_many_failures(study, before):
            raise SearchAborted(
                "every recent trial failed; stopping instead of burning time. "
                "Last reason: " + last_fail_reason(study)
            )


def _sqlite_note(settings: SearchSettings, storage_arg: str) -> str | None:
    if storage_url(storage_arg).startswith("sqlite:") and settings.workers > SQLITE_WORKERS_HINT:
        return (
            f"{settings.workers} workers share one SQLite file: writes are "
            "serialised and may wait on locks. For many workers use a journal "
            "file (--storage studies/x.log) or PostgreSQL (--storage "
            "postgresql://...)."
        )
    return None


def _run_local_workers(
    settings: SearchSettings,
    storage_arg: str,
    name: str,
    n: int,
    study: optuna.Study,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None,
    search: Callable[[SearchSettings], object],
) -> None:
    """N worker processes on one study (each opens the storage itself), `cpu_count // N`
    threads each. They share one feature-cache folder (`--feature-cache-dir`, else a
    temporary one removed at the end), so each frozen feature set is computed once, by
    whichever worker needs it first. This process reports their finished trials to
    `on_trial` as they land."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = []
    threads = max(1, (os.cpu_count() or 1) // n)
    cache_dir = settings.feature_cache_dir
    tmp_cache = None
    if cache_dir is None:
        tmp_cache = cache_dir = Path(tempfile.mkdtemp(prefix="automl-cxr-features-"))
    try:
        for i in range(n):
            s = SearchSettings(
                **{
                    **settings.__dict__,
                    "workers": 1,
                    "worker_index": i,
                    "storage": storage_arg,
                    "study_name": name,
                    "feature_cache_dir": cache_dir,
                    "feature_cache_bytes": max(0, settings.feature_cache_bytes // n),
                }
            )
            s.cpus_per_trial = settings.cpus_per_trial or threads
            p = ctx.Process(
                target=_worker_main,
                args=(search, s, optuna.logging.get_verbosity()),
                daemon=False,
            )
            p.start()
            procs.append(p)
        seen = {t.number for t in study.get_trials(deepcopy=False, states=FINISHED)}
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=1.0 / n)
            if on_trial is not None:
                seen = _report_new(study, seen, on_trial)
        if on_trial is not None:
            _report_new(study, seen, on_trial)
    except KeyboardInterrupt:
        for p in procs:  # they got the same SIGINT: let them mark their trials failed
            p.join(timeout=30)
        raise
    finally:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise StorageError(f"{len(bad)} worker process(es) failed with exit codes {bad}")


def _report_new(
    study: optuna.Study,
    seen: set[int],
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None],
) -> set[int]:
    """Call `on_trial` for each trial that finished since `seen`; returns the new `seen`."""
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        if t.number not in seen:
            seen.add(t.number)
            on_trial(study, t)
    return seen


def _worker_main(
    search: Callable[[SearchSettings], object], settings: SearchSettings, optuna_verbosity: int
) -> None:
    """A worker process: the whole search (`run_search`, passed in by the runner) on the
    shared storage, one CPU thread per trial unless told otherwise."""
    import torch

    # a spawned process starts with Optuna's default (INFO): keep the parent's verbosity, so
    # the console shows the parent's one line per trial, not every worker's log line too
    optuna.logging.set_verbosity(optuna_verbosity)
    torch.set_num_threads(settings.cpus_per_trial or 1)
    search(settings)
