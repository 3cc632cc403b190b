"""What a run searches, and the study it writes to: the space resolved and adapted to the
profile, the study created (its settings stored on it) or resumed (checked against them), and
the reference configurations queued first."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from automl_cxr._compat.optuna import enqueued_params
from automl_cxr.data import PreparedDataset, source_label_alignment
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.study._optuna import make_pruner, study_sampler
from automl_cxr.study._profiles import Profile
from automl_cxr.study._protocol import check_protocol, legacy_protocol
from automl_cxr.study._settings import SearchSettings
from automl_cxr.study._space import SearchSpace, builtin_space, load_space

__all__ = [
    "PAPER_HEADLINE",
    "adapt_space",
    "check_segmenter",
    "load_or_create",
    "pruning_budget",
    "queue_references",
    "resolve_space",
]


def queue_references(
    study: optuna.Study,
    references: list[dict[str, Any]],
    log: Callable[[str], None] | None = None,
) -> None:
    """Enqueue each reference configuration not already waiting, running or complete."""
    for fixed in references:
        if _queued_or_done(study, fixed):
            continue
        study.enqueue_trial(fixed, user_attrs={"reference": True})
        if log:
            log(f"queued first (a reference: never pruned): {fixed}")


def _queued_or_done(study: optuna.Study, fixed: Mapping[str, Any]) -> bool:
    """Whether a waiting, running or complete trial already has these parameter values (a
    pruned or failed one does not count: a queued reference is meant to run to the end)."""
    states = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    for t in study.get_trials(deepcopy=False, states=states):
        have = {**t.params, **enqueued_params(t)}
        if all(k in have and have[k] == v for k, v in fixed.items()):
            return True
    return False


def load_or_create(
    settings: SearchSettings,
    storage: optuna.storages.BaseStorage,
    name: str,
    profile: Profile,
    space: SearchSpace,
    dataset: PreparedDataset,
    *,
    protocol: dict[str, Any] | None = None,
    external_sets: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create the study (storing what it searches, on what data, under which protocol) or
    resume it (refusing other data, objectives or protocol — seed, cv, profile, folds, space,
    sampler, pruner, device, precision, package versions; see `_protocol`)."""
    multi = len(settings.objectives) > 1
    sampler = study_sampler(settings.sampler, settings.seed, multi=multi)
    n_folds = len(protocol["folds"]) if protocol else None
    pruner = make_pruner(settings.pruner, pruning_budget(profile, space, n_folds))
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
    attrs = study.user_attrs
    if not attrs.get("dataset"):
        align = source_label_alignment(dataset.manifest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(settings.objectives))
        # `dataset` marks a study whose settings are stored: it is written last, so a crash
        # part-way leaves a study without it, whose next run writes them all again (Optuna's
        # storages have no multi-attribute transaction; each attribute is atomic).
        for k, v in {
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
            "cv": settings.cv,
            **({"protocol": protocol} if protocol else {}),
            "dataset": dataset.name,
        }.items():
            study.set_user_attr(k, v)
    else:
        if protocol:  # every differing field at once (a subsample's hash follows the seed)
            check_protocol(attrs.get("protocol") or legacy_protocol(attrs), protocol, name)
            if not attrs.get("protocol"):
                study.set_user_attr("protocol", protocol)
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
    if external_sets is not None and attrs.get("external_sets") != external_sets:
        study.set_user_attr("external_sets", external_sets)
    return study


def pruning_budget(profile: Profile, space: SearchSpace, n_folds: int | None = None) -> int:
    """The pruner's max_resource: the last step a trial reports, i.e. folds × epochs, with the
    largest epochs the space can draw and one fold under a holdout split (as ASHA's
    `max_t` does)."""
    epochs = profile.epochs
    spec = space.train.get("epochs")
    if spec is not None:
        if spec.kind in ("int", "float"):
            epochs = int(spec.high)
        elif spec.kind == "categorical":
            epochs = int(max(spec.choices))
        elif spec.value is not None:
            epochs = int(spec.value)
    if n_folds is None:
        n_folds = 1 if profile.holdout is not None else (profile.max_folds or profile.n_folds)
    return max(1, epochs * n_folds)


PAPER_HEADLINE = {
    "covid_accuracy": 0.9678,
    "covid_sensitivity": 0.9866,
    "covid_specificity": 0.9646,
    "backbone": "MobileNet v2",
    "reference": "Apostolopoulos & Mpesiana 2020, dataset 2",
}
"""The seed paper's best result (MobileNet v2 on its dataset 2, COVID-19 vs rest, 10-fold CV),
stored on every study so its report can print ours beside it."""


def resolve_space(space: str | Path | SearchSpace | None, profile: Profile) -> SearchSpace:
    """The search space: as given, else the profile's default space (e.g. `cpu.yaml` for
    `cpu`), else `default.yaml`; both ship with the package (`studies/` holds copies)."""
    if isinstance(space, SearchSpace):
        return space
    if space is None and profile.space:
        return builtin_space(profile.space)
    return load_space(space)


def check_segmenter(space: SearchSpace, data_dir: str | Path, storage: str | None = None) -> None:
    """A space that can draw `roi: lung_crop|lung_mask` needs the lung segmenter: refused before
    any trial when `<data_dir>/lungs/segmenter.pt` is missing or unreadable. With a `storage`
    whose artifact folder is on disk, a copy is kept there (`study_segmenter`), so `export`
    retrains its trials with the same one."""
    roi = space.train.get("roi")
    if roi is None:
        return
    values = list(roi.choices) if roi.kind == "categorical" else [roi.value]
    if all(v == "full" for v in values):
        return
    import shutil

    from automl_cxr.lungs import DEFAULT_SEGMENTER, load_segmenter, study_segmenter
    from automl_cxr.oof import artifact_dir

    seg = load_segmenter(Path(data_dir) / DEFAULT_SEGMENTER)  # DataError: how to train one
    where = artifact_dir(storage) if storage else None
    copy_to = study_segmenter(where, seg.key) if where is not None else None
    if copy_to is not None and not copy_to.is_file():
        try:
            copy_to.parent.mkdir(parents=True, exist_ok=True)
            tmp = copy_to.with_suffix(".tmp")
            shutil.copyfile(seg.path, tmp)
            tmp.replace(copy_to)
        except OSError:  # an unwritable artifact folder never stops a search (as for the OOF
            pass  # store); `export` then needs the data folder's segmenter to be the same


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
