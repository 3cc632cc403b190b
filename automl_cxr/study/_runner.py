"""Run a study to N finished trials, stage by stage: settings → space → data → protocol →
external sets → study (created or resumed) → backend (this process or N local workers:
`_local.py`; Ray Tune: `_ray.run_ray`) → summary. With N local workers the stages before the
trials run in a child process, so this one never imports torch (`_coordinate.py`)."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from automl_cxr._storage import close_storage, open_storage, storage_url
from automl_cxr.data import PreparedDataset, load_dataset
from automl_cxr.study._coordinate import coordinates_only, run_setup_child
from automl_cxr.study._external import external_summary, prepare_externals
from automl_cxr.study._local import run_local, run_workers
from automl_cxr.study._optuna import finished_count
from automl_cxr.study._profiles import Profile, default_profile, get_profile, profile_workers
from automl_cxr.study._protocol import check_metrics, space_hash, study_protocol
from automl_cxr.study._recovery import reconcile_dead_trials
from automl_cxr.study._settings import SearchSettings, SearchSummary
from automl_cxr.study._setup import (
    adapt_space,
    check_segmenter,
    load_or_create,
    queue_references,
    resolve_space,
)
from automl_cxr.study._space import SearchSpace
from automl_cxr.study._testsplit import describe_held, search_data

__all__ = ["run_search"]


def _test_line(info: dict) -> str:
    return (
        f"test split {info['spec']}: {describe_held(info)} set aside before the search; it "
        f"trains and validates on the other {info['n_search']}"
    )


def _run_protocol(settings: SearchSettings, profile: Profile, space: SearchSpace) -> dict:
    """The protocol fields the settings decide: space, sampler, pruner, device, precision.
    Ray trials run where the cluster places them: on a GPU exactly when they ask for one."""
    from automl_cxr.engine import resolve_device, run_precision

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


@dataclasses.dataclass
class _Data:
    """What the search trains and validates on and what it sets aside."""

    full: PreparedDataset
    dataset: PreparedDataset
    test: PreparedDataset | None
    test_info: dict | None


def run_search(
    settings: SearchSettings,
    *,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> SearchSummary:
    """Run (or resume) the study until it holds `settings.trials` finished trials.

    The stages, each entered once: settings → space → data → protocol → external sets →
    study → backend → summary. Everything that can be refused (a bad --enqueue, a metric
    the classes lack, a missing segmenter, --cv site on data without sites) is refused
    before a study row is written."""
    coordinated = coordinates_only(settings)
    if coordinated is not None:  # every trial in a worker: this process stays torch-free
        settings, storage_arg, name, notes = run_setup_child(coordinated, prepare_study, log)
        storage = open_storage(storage_arg)
        study = optuna.load_study(study_name=name, storage=storage)
        backend = functools.partial(
            run_workers, settings, study, storage_arg, name, search=run_search
        )
    else:
        ready = _ready_study(settings, log)
        settings, study, name, notes = ready.settings, ready.study, ready.name, ready.notes
        storage, storage_arg = ready.storage, ready.storage_arg
        backend = functools.partial(_run_backend, ready)
    start, before = time.time(), len(study.trials)
    if finished_count(study) < settings.trials:
        notes = notes + backend(on_trial=on_trial, log=log)
    close_storage(storage)
    return _summary(settings, study, name, storage_arg, start, before, notes)


def _run_backend(
    ready: _Ready,
    *,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None,
    log: Callable[[str], None] | None,
) -> list[str]:
    """The missing trials here or in local workers (`run_local`) or on Ray (`run_ray`);
    returns the notes to carry into the summary."""
    data = ready.data
    if ready.settings.backend == "ray":
        from automl_cxr.study._ray import run_ray  # imports ray: only when asked for

        run_ray(
            ready.settings,
            ready.study,
            data.dataset,
            ready.space,
            ready.profile,
            ready.storage_arg,
            on_trial=on_trial,
            log=log,
            externals=ready.externals,
            test=data.test,
        )
        return []
    return run_local(
        ready.settings,
        ready.study,
        data.dataset,
        ready.space,
        ready.profile,
        ready.storage_arg,
        ready.name,
        search=run_search,
        on_trial=on_trial,
        log=log,
        externals=ready.externals,
        test=data.test,
    )


@dataclasses.dataclass
class _Ready:
    """A study created or resumed, and what its trials need."""

    settings: SearchSettings
    profile: Profile
    space: SearchSpace
    data: _Data
    externals: list[PreparedDataset]
    storage: object
    storage_arg: str
    name: str
    study: optuna.Study
    notes: list[str]


def _ready_study(settings: SearchSettings, log: Callable[[str], None] | None) -> _Ready:
    """The stages before the trials: settings → space → data → protocol → external sets →
    study."""
    settings, profile = _settings_stage(settings)
    space, references = _space_stage(settings, profile, log)
    data = _data_stage(settings, profile, space, log)
    protocol = _protocol_stage(settings, profile, space, data, log)
    externals = _externals_stage(settings, data.full, log)
    storage_arg = settings.storage or str(Path("studies") / f"{settings.dataset}.db")
    storage = open_storage(storage_arg)
    name = settings.study_name or f"{settings.dataset}-{profile.name}"
    study = load_or_create(
        settings,
        storage,
        name,
        profile,
        space,
        data.dataset,
        protocol=protocol,
        external_sets=external_summary(externals) if externals else None,
    )
    notes = _study_stage(settings, study, references, log)
    return _Ready(
        settings, profile, space, data, externals, storage, storage_arg, name, study, notes
    )


def prepare_study(
    settings: SearchSettings, log: Callable[[str], None] | None = None
) -> tuple[SearchSettings, str, str, list[str]]:
    """The stages before the trials alone (for a coordinating process's setup child):
    (settings with the worker count decided, storage, study name, notes)."""
    ready = _ready_study(settings, log)
    close_storage(ready.storage)
    return ready.settings, ready.storage_arg, ready.name, ready.notes


def _settings_stage(settings: SearchSettings) -> tuple[SearchSettings, Profile]:
    """The profile, with the settings' overrides; the worker count it implies."""
    profile = get_profile(settings.profile) if settings.profile else default_profile()
    if settings.cpu_amp is not None and settings.cpu_amp != profile.cpu_amp:
        profile = dataclasses.replace(profile, cpu_amp=settings.cpu_amp)
    if settings.workers is None:
        settings = dataclasses.replace(settings, workers=profile_workers(profile))
    return settings, profile


def _space_stage(
    settings: SearchSettings, profile: Profile, log: Callable[[str], None] | None
) -> tuple[SearchSpace, list[dict]]:
    """The search space for the profile, and the --enqueue references checked against it
    (before any data is read or any study is created: a bad --enqueue changes nothing)."""
    space = adapt_space(resolve_space(settings.space, profile), profile, log)
    return space, [space.check_params(p, profile.backbones) for p in settings.enqueue]


def _data_stage(
    settings: SearchSettings,
    profile: Profile,
    space: SearchSpace,
    log: Callable[[str], None] | None,
) -> _Data:
    """The dataset (its manifest: nothing decoded yet), checked against the objectives and
    the space; the test split first (whole patients or sites, by seed), then the profile's
    subsample."""
    full = load_dataset(settings.dataset, settings.data_dir)
    check_metrics(settings.objectives, full.classes, full.positive, dataset=full.name)
    check_segmenter(space, settings.data_dir, settings.storage)
    dataset, test, test_info = search_data(
        full, profile.max_per_class, settings.seed, settings.test
    )
    if test_info and log:
        log(_test_line(test_info))
    return _Data(full, dataset, test, test_info)


def _protocol_stage(
    settings: SearchSettings,
    profile: Profile,
    space: SearchSpace,
    data: _Data,
    log: Callable[[str], None] | None,
) -> dict:
    """The evaluation protocol: the folds (and whether the data allows --cv site), the
    space, sampler, pruner, device and precision, the test split."""
    protocol = study_protocol(
        data.dataset,
        profile,
        seed=settings.seed,
        cv=settings.cv,
        run={**_run_protocol(settings, profile, space), "test": data.test_info},
    )
    if log:
        for w in protocol["fold_warnings"]:
            log(f"warning: {w}")
    return protocol


def _externals_stage(
    settings: SearchSettings, full: PreparedDataset, log: Callable[[str], None] | None
) -> list[PreparedDataset]:
    """The external sets, read and checked for copies of training images (after the
    protocol: a refused --cv costs no reading)."""
    if not settings.externals:
        return []
    return prepare_externals(
        settings.externals,
        dataset=full,
        data_dir=settings.data_dir,
        label_map=settings.external_label_map,
        log=log,
        drop_overlap=settings.drop_overlap,
    )


def _study_stage(
    settings: SearchSettings,
    study: optuna.Study,
    references: list[dict],
    log: Callable[[str], None] | None,
) -> list[str]:
    """The created or resumed study made ready: references queued (by the first worker),
    trials of dead workers marked FAILED for a re-run. Returns the notes to carry."""
    if settings.worker_index == 0:
        queue_references(study, references, log)
    reconciled = reconcile_dead_trials(study)
    if reconciled and log:
        log(f"marked trial(s) {reconciled} FAILED: their worker died; they will be retried")
    align = study.user_attrs.get("source_label_alignment") or {}
    return [align["warning"]] if align.get("warning") else []


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
