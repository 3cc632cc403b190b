"""Run a study to N finished trials: create or resume, sample, prune, show progress."""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from automl_cxr.data import load_dataset
from automl_cxr.data._diagnostics import source_label_alignment
from automl_cxr.engine import SCALAR_METRICS, FeatureCache
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.study._objective import OBJECTIVE_KEYS, Objective, subsample
from automl_cxr.study._profiles import Profile, default_profile, get_profile
from automl_cxr.study._space import SearchSpace, builtin_space, load_space
from automl_cxr.study._storage import close_storage, open_storage, storage_url

__all__ = [
    "FINISHED",
    "SAMPLERS",
    "PRUNERS",
    "SearchSettings",
    "SearchSummary",
    "WorkerTaggingSampler",
    "adapt_space",
    "make_pruner",
    "make_sampler",
    "enqueue_retry",
    "reconcile_dead_trials",
    "run_search",
]

MAX_RETRIES = 2
"""A trial that failed transiently (I/O, lost worker) is re-run with the same parameters at
most this many times."""
SQLITE_WORKERS_HINT = 4
"""More local workers than this on one SQLite file: recommend a journal file or PostgreSQL."""

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""States that count towards `--trials` (failed trials are retried, not counted)."""
SAMPLERS = ("tpe", "random", "nsga2")
PRUNERS = ("hyperband", "median", "none")
BACKENDS = ("local", "ray")


@dataclass
class SearchSettings:
    """Everything `automl-cxr search` takes, validated."""

    dataset: str
    trials: int
    data_dir: Path
    storage: str | None = None
    study_name: str | None = None
    space: str | Path | SearchSpace | None = None
    profile: str | None = None
    metric: str = "balanced_accuracy"
    objectives: Sequence[str] | None = None
    sampler: str = "tpe"
    pruner: str = "hyperband"
    backend: str = "local"
    workers: int = 1
    cpus_per_trial: int | None = None
    gpus_per_trial: float | None = None
    address: str | None = None
    scheduler: str | None = None
    timeout: float | None = None
    seed: int = 0
    feature_cache_dir: Path | None = None
    feature_cache_bytes: int = 4 << 30
    worker_index: int = 0  # local parallel workers: offsets the sampler's seed only
    enqueue: Sequence[Mapping[str, Any]] = ()  # configurations to run first (partial is fine)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials must be at least 1, but got trials={self.trials}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, but got workers={self.workers}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, but got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner must be one of {PRUNERS}, but got {self.pruner!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, but got {self.backend!r}")
        if self.backend == "local":
            ray_only = {
                "--scheduler": self.scheduler,
                "--address": self.address,
                "--gpus-per-trial": self.gpus_per_trial,
            }
            given = [k for k, v in ray_only.items() if v is not None]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} only apply with --backend ray, but got backend='local'"
                )
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, but got timeout={self.timeout}")
        if self.cpus_per_trial is not None and self.cpus_per_trial < 1:
            raise ConfigError(
                f"cpus_per_trial must be at least 1, but got cpus_per_trial={self.cpus_per_trial}"
            )
        if self.gpus_per_trial is not None and self.gpus_per_trial < 0:
            raise ConfigError(
                f"gpus_per_trial must be at least 0, but got gpus_per_trial={self.gpus_per_trial}"
            )
        allowed = (*SCALAR_METRICS, "sensitivity_<class>", "specificity_<class>")
        objectives = list(self.objectives or [self.metric])
        for m in objectives:
            if (
                m in OBJECTIVE_KEYS
                or m in SCALAR_METRICS
                or m.startswith(("sensitivity_", "specificity_"))
            ):
                continue
            raise ConfigError(
                f"unknown metric {m!r}; allowed: {list(allowed)} and, as costs, "
                f"{sorted(OBJECTIVE_KEYS)}"
            )
        if all(m in OBJECTIVE_KEYS for m in objectives):
            raise ConfigError(
                f"objectives need at least one metric besides costs, got {objectives}"
            )
        if len(objectives) > 1 and self.sampler == "tpe":
            self.sampler = "nsga2"  # the multi-objective default
        self.objectives = objectives

    @property
    def directions(self) -> list[str]:
        return ["minimize" if m in OBJECTIVE_KEYS else "maximize" for m in self.objectives]


@dataclass
class SearchSummary:
    study_name: str
    storage: str
    counts: dict[str, int]
    best: dict | None
    seconds: float
    ran: int
    warnings: list[str] = field(default_factory=list)


class WorkerTaggingSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler and records the worker (host, pid) on each trial as it is created, so a
    trial whose process is killed can be recognised at once by the next run on this host."""

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        study._storage.set_trial_user_attr(
            trial._trial_id, "worker", {"host": socket.gethostname(), "pid": os.getpid()}
        )
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def make_sampler(name: str, seed: int, *, multi: bool) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if multi:
        return optuna.samplers.NSGAIISampler(seed=seed)
    # multivariate + group: the head's conditional parameters are modelled together
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, n_startup_trials=5
        )


def make_pruner(name: str, max_resource: int) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, max_resource))


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def reconcile_dead_trials(study: optuna.Study, *, host: str | None = None) -> list[int]:
    """Trials RUNNING on this host whose worker process no longer exists → FAIL, re-enqueued.

    Heartbeats do the same across machines after a grace period; this does it at once for the
    common case of a killed local run.
    """
    host = host or socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        if w.get("host") != host or _pid_alive(int(w.get("pid", -1))):
            continue
        storage = study._storage
        try:
            storage.set_trial_user_attr(
                t._trial_id, "fail_reason", "worker process died (killed or crashed)"
            )
            ok = storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:  # another worker got there first
            continue
        if ok:
            failed.append(t.number)
            enqueue_retry(study, t)
    return failed


def enqueue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Re-run a failed trial's parameters (bounded by MAX_RETRIES along a retry chain)."""
    retries = int(trial.user_attrs.get("retries", 0))
    if retries >= MAX_RETRIES or not trial.params:
        return False
    study.enqueue_trial(
        trial.params,
        user_attrs={"retry_of": trial.number, "retries": retries + 1},
        skip_if_exists=False,
    )
    return True


def _retry_transient(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if trial.state == TrialState.FAIL and trial.user_attrs.get("fail_kind") == "transient":
        enqueue_retry(study, trial)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return False  # our own trial left RUNNING from an earlier call in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _queued_or_done(study: optuna.Study, fixed: Mapping[str, Any]) -> bool:
    """Whether a waiting, running or complete trial already has these parameter values (a
    pruned or failed one does not count: a queued reference is meant to run to the end)."""
    states = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    for t in study.get_trials(deepcopy=False, states=states):
        have = {**t.params, **t.system_attrs.get("fixed_params", {})}
        if all(k in have and have[k] == v for k, v in fixed.items()):
            return True
    return False


def sampler_seed(seed: int, worker_index: int = 0, n_existing: int = 0) -> int:
    """The sampler's seed for a run that starts with `n_existing` trials in the study: `seed`
    itself for a fresh single-process study (same seed, same parameters), otherwise a value
    derived from all three, so that resumed runs and parallel workers draw new points."""
    if worker_index == 0 and n_existing == 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed), worker_index, n_existing]).generate_state(1)[0])


def _load_or_create(
    settings: SearchSettings, storage, name: str, profile: Profile, space: SearchSpace, dataset
) -> optuna.Study:
    multi = len(settings.objectives) > 1

    def sampler_for(n_existing: int) -> WorkerTaggingSampler:
        return WorkerTaggingSampler(
            make_sampler(
                settings.sampler,
                sampler_seed(settings.seed, settings.worker_index, n_existing),
                multi=multi,
            )
        )

    sampler = sampler_for(0)
    max_res = max(1, profile.epochs * (profile.max_folds or profile.n_folds))
    pruner = make_pruner(settings.pruner, max_res)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            directions=settings.directions,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except ValueError as exc:  # e.g. directions differ from the existing study
        raise StorageError(f"cannot use study {name!r}: {exc}") from None
    n_existing = len(study.get_trials(deepcopy=False))
    if n_existing:
        # A resumed run (or a later worker) must not replay the draws of the first one.
        study.sampler = sampler_for(n_existing)
    attrs = study.user_attrs
    if not attrs.get("dataset"):
        align = source_label_alignment(dataset.manifest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(settings.objectives))
        for k, v in {
            "dataset": dataset.name,
            "dataset_hash": dataset.hash,
            "classes": dataset.classes,
            "positive": dataset.positive,
            "objectives": list(settings.objectives),
            "metric": settings.objectives[0],
            "profile": profile.to_dict(),
            "space": space.to_dict(),
            "sampler": settings.sampler,
            "pruner": settings.pruner,
            "seed": settings.seed,
            "source_label_alignment": {
                "cramers_v": align["cramers_v"],
                "warning": align["warning"],
            },
            "paper": PAPER_HEADLINE,
        }.items():
            study.set_user_attr(k, v)
    else:
        if attrs.get("dataset_hash") != dataset.hash:
            raise StorageError(
                f"study {name!r} was run on dataset {attrs.get('dataset')!r} with content hash "
                f"{str(attrs.get('dataset_hash'))[:12]}, but the data now has hash "
                f"{dataset.hash[:12]}: use another --study-name, or prepare the same data"
            )
        if list(attrs.get("objectives") or []) != list(settings.objectives):
            raise StorageError(
                f"study {name!r} optimises {attrs.get('objectives')}, not {settings.objectives}: "
                "use another --study-name"
            )
        if attrs.get("space") is not None and attrs["space"] != space.to_dict():
            # The space may change between runs (Optuna allows it); keep what each run used.
            history = [*attrs.get("space_history", []), attrs["space"]]
            study.set_user_attr("space_history", history)
            study.set_user_attr("space", space.to_dict())
    return study


PAPER_HEADLINE = {
    "covid_accuracy": 0.9678,
    "covid_sensitivity": 0.9866,
    "covid_specificity": 0.9646,
    "backbone": "MobileNet v2",
    "reference": "Apostolopoulos & Mpesiana 2020, dataset 2",
}
"""The seed paper's best result (MobileNet v2 on its dataset 2, COVID-19 vs rest, 10-fold CV),
stored on every study so its report can print ours beside it."""


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
    full = load_dataset(settings.dataset, settings.data_dir)
    dataset = subsample(full, profile.max_per_class, settings.seed)
    storage_arg = settings.storage or str(Path("studies") / f"{settings.dataset}.db")
    storage = open_storage(storage_arg)
    name = settings.study_name or f"{settings.dataset}-{profile.name}"
    study = _load_or_create(settings, storage, name, profile, space, dataset)
    if settings.worker_index == 0:
        for fixed in references:
            if _queued_or_done(study, fixed):
                continue
            study.enqueue_trial(fixed, user_attrs={"reference": True})
            if log:
                log(f"queued first (a reference: never pruned): {fixed}")
    reconciled = reconcile_dead_trials(study)
    if reconciled and log:
        log(f"marked trial(s) {reconciled} FAILED: their worker died; they will be retried")
    notes: list[str] = []
    align = study.user_attrs.get("source_label_alignment") or {}
    if align.get("warning"):
        notes.append(align["warning"])
    start = time.time()
    before = len(study.trials)
    if _finished(study) < settings.trials:
        if settings.backend == "ray":
            from automl_cxr.study._ray import run_ray

            run_ray(
                settings, study, dataset, space, profile, storage_arg, on_trial=on_trial, log=log
            )
        else:
            objective = Objective(
                dataset,
                space,
                profile,
                metrics=settings.objectives,
                seed=settings.seed,
                feature_cache=FeatureCache(
                    settings.feature_cache_bytes, settings.feature_cache_dir
                ),
            )
            if settings.workers > 1:
                if (
                    storage_url(storage_arg).startswith("sqlite:")
                    and settings.workers > SQLITE_WORKERS_HINT
                ):
                    notes.append(
                        f"{settings.workers} workers share one SQLite file: writes are "
                        "serialised and may wait on locks. For many workers use a journal "
                        "file (--storage studies/x.log) or PostgreSQL (--storage "
                        "postgresql://...)."
                    )
                    if log:
                        log(notes[-1])
                _run_local_workers(settings, storage_arg, name, settings.workers)
            else:
                callbacks = [
                    optuna.study.MaxTrialsCallback(settings.trials, states=FINISHED),
                    _retry_transient,
                ]
                if on_trial:
                    callbacks.append(on_trial)
                while _finished(study) < settings.trials:
                    remaining = settings.trials - _finished(study)
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
                    if _too_many_failures(study, before):
                        raise StorageError(
                            "every recent trial failed; stopping instead of burning time. "
                            "Last reason: " + _last_fail_reason(study)
                        )
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
    close_storage(storage)
    return SearchSummary(
        study_name=name,
        storage=storage_url(storage_arg),
        counts={k: v for k, v in counts.items() if v},
        best=best,
        seconds=round(time.time() - start, 2),
        ran=len(study.trials) - before,
        warnings=notes,
    )


def resolve_space(space: str | Path | SearchSpace | None, profile: Profile) -> SearchSpace:
    """The search space: as given, else the profile's default file (e.g. `studies/cpu.yaml`
    for `cpu`), else `studies/default.yaml`."""
    if isinstance(space, SearchSpace):
        return space
    if space is None and profile.space:
        return builtin_space(profile.space)
    return load_space(space)


def adapt_space(
    space: SearchSpace, profile: Profile, log: Callable[[str], None] | None = None
) -> SearchSpace:
    """The space a study searches under `profile`: its backbones (`_search_backbones`) and, for
    a profile with `min_frozen_fraction`, its frozen_fraction clipped to at least that."""
    out = copy.deepcopy(space)
    out.backbones = _search_backbones(space, profile, log)
    floor = profile.min_frozen_fraction
    ff = out.frozen_fraction
    if floor is None:
        return out
    where = f"profile {profile.name!r} needs frozen_fraction >= {floor}, but the space"
    if ff.kind == "fixed":
        if float(ff.value) < floor:
            raise ConfigError(f"{where} fixes it at {ff.value}")
    elif ff.kind == "categorical":
        kept = tuple(c for c in ff.choices if float(c) >= floor)
        if not kept:
            raise ConfigError(f"{where} offers only {list(ff.choices)}")
        if kept != ff.choices and log:
            log(f"{where} offers {list(ff.choices)}: searching {list(kept)}")
        out.frozen_fraction = dataclasses.replace(ff, choices=kept)
    elif ff.low < floor:
        if ff.high < floor:
            raise ConfigError(f"{where} ranges over [{ff.low}, {ff.high}]")
        if log:
            log(f"{where} ranges over [{ff.low}, {ff.high}]: searching [{floor}, {ff.high}]")
        out.frozen_fraction = dataclasses.replace(ff, low=floor)
    return out


def _search_backbones(
    space: SearchSpace, profile: Profile, log: Callable[[str], None] | None = None
) -> tuple[str, ...] | None:
    """The backbones a study searches: the space's list; else (or, for a profile with
    `backbones_from_profile`, always) the profile's, keeping only those whose pretrained
    weights can be had here when the profile is pretrained. None: the profile's, untested."""
    if profile.backbones_from_profile:
        if space.backbones and log:
            log(
                f"profile {profile.name!r} searches its own backbones "
                f"{list(profile.backbones)} in place of the space's {list(space.backbones)}"
            )
    elif space.backbones:
        return tuple(space.backbones)
    if profile.pretrained:
        return _backbones_with_weights(profile, log)
    return None


def _backbones_with_weights(profile: Profile, log: Callable[[str], None] | None) -> tuple:
    """The profile's backbones whose pretrained weights can be had on this machine now."""
    from automl_cxr.errors import WeightsUnavailable
    from automl_cxr.models import resolve_weights

    ok, missing = [], []
    for name in profile.backbones:
        try:
            resolve_weights(name, checksum=False)
            ok.append(name)
        except WeightsUnavailable:
            missing.append(name)
    if missing and log:
        log(f"profile {profile.name!r}: no pretrained weights here for {missing}; searching {ok}")
    if not ok:
        raise WeightsUnavailable(
            f"none of profile {profile.name!r}'s backbones {list(profile.backbones)} has "
            "pretrained weights on this machine; see `automl-cxr models list` for how to supply "
            "them, or pass --space with backbones you have weights for"
        )
    return tuple(ok)


def _too_many_failures(study: optuna.Study, before: int, window: int = 5) -> bool:
    new = study.get_trials(deepcopy=False)[before:]
    if len(new) < window:
        return False
    return all(t.state == TrialState.FAIL for t in new[-window:])


def _last_fail_reason(study: optuna.Study) -> str:
    for t in reversed(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))):
        r = t.user_attrs.get("fail_reason")
        if r:
            return str(r)
    return "unknown"


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
