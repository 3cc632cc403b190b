"""Run a study to N finished trials: create or resume it, then run trials in this process,
in N local worker processes, or through Ray (`_ray.run_ray`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from automl_cxr.data import PreparedDataset, load_dataset
from automl_cxr.engine import FeatureCache
from automl_cxr.errors import SearchAborted, StorageError
from automl_cxr.study._external import external_summary, prepare_externals
from automl_cxr.study._objective import Objective, subsample
from automl_cxr.study._optuna import (  # noqa: F401  (re-exported for older imports)
    FINISHED,
    PRUNERS,
    SAMPLERS,
    WorkerTaggingSampler,
    finished_count,
    make_pruner,
    make_sampler,
)
from automl_cxr.study._profiles import Profile, default_profile, get_profile
from automl_cxr.study._protocol import check_metrics, study_protocol
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
    load_or_create,
    queue_references,
    resolve_space,
)
from automl_cxr.study._space import SearchSpace
from automl_cxr.study._storage import close_storage, open_storage, storage_url

__all__ = ["SQLITE_WORKERS_HINT", "run_search"]

SQLITE_WORKERS_HINT = 4
"""More local workers than this on one SQLite file: recommend a journal file or PostgreSQL."""


def run_search(
    settings: SearchSettings,
    *,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> SearchSummary:
    """Run (or resume) the study until it holds `settings.trials` finished trials."""
    profile = get_profile(settings.profile) if settings.profile else default_profile()
    space = adapt_space(resolve_space(settings.space, profile), profile, log)
    # Checked before any data is read or any study is created: a bad --enqueue changes nothing.
    references = [space.check_params(p, profile.backbones) for p in settings.enqueue]
    full = load_dataset(settings.dataset, settings.data_dir)  # the manifest: nothing decoded
    check_metrics(settings.objectives, full.classes, full.positive, dataset=full.name)
    dataset = subsample(full, profile.max_per_class, settings.seed)
    # The folds (and whether the data allows --cv site) before any study row is written.
    protocol = study_protocol(dataset, profile, seed=settings.seed, cv=settings.cv)
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
            )
        elif settings.workers > 1:
            note = _sqlite_note(settings, storage_arg)
            if note:
                notes.append(note)
                if log:
                    log(note)
            _run_local_workers(settings, storage_arg, name, settings.workers)
        else:
            _run_here(settings, study, dataset, space, profile, before, on_trial, externals)
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
    )
    callbacks = [
        optuna.study.MaxTrialsCallback(settings.trials, states=FINISHED),
        retry_transient,
    ]
    if on_trial:
        callbacks.append(on_trial)
    while finished_count(study) < settings.trials:
        remaining = settings.trials - finished_count(study)
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
            gc_after_trial=True,
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


def _run_local_workers(settings: SearchSettings, storage_arg: str, name: str, n: int) -> None:
    """N worker processes on one study (each opens the storage itself)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = []
    threads = max(1, (os.cpu_count() or 1) // n)
    for i in range(n):
        s = SearchSettings(
            **{
                **settings.__dict__,
                "workers": 1,
                "worker_index": i,
                "storage": storage_arg,
                "study_name": name,
            }
        )
        s.cpus_per_trial = settings.cpus_per_trial or threads
        p = ctx.Process(target=_worker_main, args=(s,), daemon=False)
        p.start()
        procs.append(p)
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise StorageError(f"{len(bad)} worker process(es) failed with exit codes {bad}")


def _worker_main(settings: SearchSettings) -> None:
    import torch

    torch.set_num_threads(settings.cpus_per_trial or 1)
    run_search(settings)
