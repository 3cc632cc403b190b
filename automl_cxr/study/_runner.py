"""Run a study to N finished trials: create or resume it, then run trials in this process,
in N local worker processes, or through Ray (`_ray.run_ray`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from automl_cxr._storage import close_storage, open_storage, storage_url
from automl_cxr.data import PreparedDataset, load_dataset
from automl_cxr.engine import FeatureCache, resolve_device, run_precision
from automl_cxr.errors import SearchAborted, StorageError
from automl_cxr.study._external import external_summary, prepare_externals
from automl_cxr.study._objective import Objective
from automl_cxr.study._optuna import (  # noqa: F401  (re-exported for older imports)
    FINISHED,
    PRUNERS,
    SAMPLERS,
    WorkerTaggingSampler,
    finished_count,
    make_pruner,
    make_sampler,
)
from automl_cxr.study._profiles import Profile, default_profile, get_profile, profile_workers
from automl_cxr.study._protocol import check_metrics, space_hash, study_protocol
from automl_cxr.study._recovery import (  # noqa: F401  (re-exported for older imports)
    MAX_RETRIES,
    enqueue_retry,
    last_fail_reason,
    reconcile_dead_trials,
    retry_transient,
    too_many_failures,
)
from automl_cxr.study._settings import SearchSettings, SearchSummary
from automl_cxr.study._setup import (  # noqa: F401  (re-exported for older imports)
    _queued_or_done,
    adapt_space,
    check_segmenter,
    load_or_create,
    queue_references,
    resolve_space,
)
from automl_cxr.study._space import SearchSpace
from automl_cxr.study._testsplit import describe_held, search_data

__all__ = ["SQLITE_WORKERS_HINT", "run_search"]

SQLITE_WORKERS_HINT = 4
"""More local workers than this on one SQLite file: recommend a journal file or PostgreSQL."""


def _test_line(info: dict) -> str:
    return (
        f"test split {info['spec']}: {describe_held(info)} set aside before the search; it "
        f"trains and validates on the other {info['n_search']}"
    )


def _run_protocol(settings: SearchSettings, profile: Profile, space: SearchSpace) -> dict:
    """The protocol fields the settings decide: space, sampler, pruner, device, precision.
    Ray trials run where the cluster places them: on a GPU exactly when they ask for one."""
    if settings.backend == "ray":
        device = "cuda" if (settings.gpus_per_trial or 0) > 0 else "cpu"
    else:
        device = resolve_device("auto").type
    return {
        "space_hash": space_hash(space),
        "sampler": settings.sampler,
        "pruner": settings.pruner,
        "device": device,
        "precision": run_precision(device, cpu_amp=profile.cpu_amp),
    }


def run_search(
    settings: SearchSettings,
    *,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> SearchSummary:
    """Run (or resume) the study until it holds `settings.trials` finished trials."""
    profile = get_profile(settings.profile) if settings.profile else default_profile()
    if settings.cpu_amp is not None and settings.cpu_amp != profile.cpu_amp:
        profile = dataclasses.replace(profile, cpu_amp=settings.cpu_amp)
    if settings.workers is None:
        settings = dataclasses.replace(settings, workers=profile_workers(profile))
    space = adapt_space(resolve_space(settings.space, profile), profile, log)
    # Checked before any data is read or any study is created: a bad --enqueue changes nothing.
    references = [space.check_params(p, profile.backbones) for p in settings.enqueue]
    full = load_dataset(settings.dataset, settings.data_dir)  # the manifest: nothing decoded
    check_metrics(settings.objectives, full.classes, full.positive, dataset=full.name)
    check_segmenter(space, settings.data_dir)
    # The test split first (whole patients or sites, by seed), then the profile's subsample.
    dataset, test, test_info = search_data(
        full, profile.max_per_class, settings.seed, settings.test
    )
    if test_info and log:
        log(_test_line(test_info))
    # The folds (and whether the data allows --cv site) before any study row is written.
    protocol = study_protocol(
        dataset,
        profile,
        seed=settings.seed,
        cv=settings.cv,
        run={**_run_protocol(settings, profile, space), "test": test_info},
    )
    if log:
        for w in protocol["fold_warnings"]:
            log(f"warning: {w}")
    externals = (
        prepare_externals(
            settings.externals,
            dataset=full,
            data_dir=settings.data_dir,
            label_map=settings.external_label_map,
            log=log,
            drop_overlap=settings.drop_overlap,
        )
        if settings.externals
        else []
    )
    storage_arg = settings.storage or str(Path("studies") / f"{settings.dataset}.db")
    storage = open_storage(storage_arg)
    name = settings.study_name or f"{settings.dataset}-{profile.name}"
    study = load_or_create(
        settings,
        storage,
        name,
        profile,
        space,
        dataset,
        protocol=protocol,
        external_sets=external_summary(externals) if externals else None,
    )
    if settings.worker_index == 0:
        queue_references(study, references, log)
    reconciled = reconcile_dead_trials(study)
    if reconciled and log:
        log(f"marked trial(s) {reconciled} FAILED: their worker died; they will be retried")
    notes: list[str] = []
    align = study.user_attrs.get("source_label_alignment") or {}
    if align.get("warning"):
        notes.append(align["warning"])
    start = time.time()
    before = len(study.trials)
    if finished_count(study) < settings.trials:
        if settings.backend == "ray":
            from automl_cxr.study._ray import run_ray  # imports ray: only when asked for

            run_ray(
                settings,
                study,
                dataset,
                space,
                profile,
                storage_arg,
                on_trial=on_trial,
                log=log,
                externals=externals,
                test=test,
            )
        elif settings.workers > 1:
            note = _sqlite_note(settings, storage_arg)
            if note:
                notes.append(note)
                if log:
                    log(note)
            _run_local_workers(settings, storage_arg, name, settings.workers, study, on_trial)
        else:
            _run_here(settings, study, dataset, space, profile, before, on_trial, externals, test)
    close_storage(storage)
    return _summary(settings, study, name, storage_arg, start, before, notes)


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
    start = time.time()
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


def _summary(
    settings: SearchSettings,
    study: optuna.Study,
    name: str,
    storage_arg: str,
    start: float,
    before: int,
    notes: list[str],
) -> SearchSummary:
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    best = None
    if len(settings.objectives) == 1:
        try:
            bt = study.best_trial
            best = {"number": bt.number, "value": bt.value, "params": bt.params}
        except ValueError:
            best = None
    return SearchSummary(
        study_name=name,
        storage=storage_url(storage_arg),
        counts={k: v for k, v in counts.items() if v},
        best=best,
        seconds=round(time.time() - start, 2),
        ran=len(study.trials) - before,
        warnings=notes,
    )


def _run_local_workers(
    settings: SearchSettings,
    storage_arg: str,
    name: str,
    n: int,
    study: optuna.Study,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None,
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
                target=_worker_main, args=(s, optuna.logging.get_verbosity()), daemon=False
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


def _worker_main(settings: SearchSettings, optuna_verbosity: int) -> None:
    import torch

    # a spawned process starts with Optuna's default (INFO): keep the parent's verbosity, so
    # the console shows the parent's one line per trial, not every worker's log line too
    optuna.logging.set_verbosity(optuna_verbosity)
    torch.set_num_threads(settings.cpus_per_trial or 1)
    run_search(settings)
