"""Open a finished study, pick a trial, and rebuild its configuration and its training data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from automl_cxr.data import PreparedDataset, load_dataset
from automl_cxr.engine import TrainConfig
from automl_cxr.errors import ConfigError, DataError, StorageError
from automl_cxr.models import ModelConfig
from automl_cxr.study import OBJECTIVE_KEYS, load_study, search_data, storage_url

__all__ = [
    "TrialSpec",
    "load_study",
    "pin_segmenter",
    "search_split",
    "select_trial",
    "trial_spec",
    "training_data",
]


def _primary_index(study: optuna.Study) -> int:
    """The first objective that is a metric (not a cost such as latency)."""
    objectives = list(study.user_attrs.get("objectives") or [])
    for i, name in enumerate(objectives):
        if name not in OBJECTIVE_KEYS:
            return i
    return 0


def select_trial(study: optuna.Study, trial: str | int = "best") -> FrozenTrial:
    """`"best"`: the best trial (single objective) or, among the Pareto front, the one with the
    best first metric objective (ties: the earlier trial). A number: that trial, which must be
    COMPLETE."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if isinstance(trial, str) and trial.strip().lower() == "best":
        if not complete:
            raise StorageError(
                f"study {study.study_name!r} has no COMPLETE trial yet: run more trials with "
                "`automl-cxr search`"
            )
        if len(study.directions) == 1:
            return study.best_trial
        k = _primary_index(study)
        sign = 1.0 if study.directions[k] == optuna.study.StudyDirection.MAXIMIZE else -1.0
        front = study.best_trials

        def key(t: FrozenTrial) -> tuple[float, int]:
            v = t.values[k] if t.values else math.nan
            return (-(sign * v) if math.isfinite(v) else math.inf, t.number)

        return min(front, key=key)
    try:
        number = int(str(trial).strip())
    except ValueError:
        raise ConfigError(f"--trial must be 'best' or a trial number, but got {trial!r}") from None
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in by_number:
        have = sorted(by_number)
        span = f"trials 0..{have[-1]}" if have else "no trials"
        raise ConfigError(
            f"no trial {number} in study {study.study_name!r} (it holds {span}); "
            f"COMPLETE ones: {_numbers(complete)}"
        )
    t = by_number[number]
    if t.state != TrialState.COMPLETE:
        reason = t.user_attrs.get("fail_reason")
        why = f" ({reason})" if reason else ""
        raise ConfigError(
            f"trial {number} of study {study.study_name!r} is {t.state.name}{why}, not "
            f"COMPLETE; choose a COMPLETE trial: {_numbers(complete)}"
        )
    return t


def _numbers(trials: list[FrozenTrial], limit: int = 20) -> str:
    nums = [str(t.number) for t in trials[:limit]]
    more = f", ... ({len(trials)} in all)" if len(trials) > limit else ""
    return (", ".join(nums) + more) if nums else "none"


@dataclass
class TrialSpec:
    """A chosen trial with everything needed to train it again, evaluate it or describe it."""

    study_name: str
    storage: str
    number: int
    model: ModelConfig
    train: TrainConfig
    classes: list[str]
    positive: str | None
    dataset: str
    dataset_hash: str | None
    objectives: list[str]
    values: list[float]
    profile: dict[str, Any]
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    user_attrs: dict[str, Any] = field(default_factory=dict)
    study_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        """The trial's recorded metrics (``summary``, ``folds``, ``pooled``, ``by_source``...)."""
        return dict(self.user_attrs.get("metrics") or {})

    @property
    def resolution(self) -> int:
        return int(self.train.resolution)

    def describe(self) -> dict[str, Any]:
        return {
            "study": self.study_name,
            "storage": self.storage,
            "trial": self.number,
            "objectives": self.objectives,
            "values": self.values,
            "params": self.params,
            "dataset": self.dataset,
            "dataset_hash": self.dataset_hash,
            "profile": self.profile.get("name"),
            "seed": self.seed,
        }


def trial_spec(study: optuna.Study, trial: FrozenTrial, *, storage: str | Path = "") -> TrialSpec:
    """Rebuild a trial's ModelConfig/TrainConfig from its `config` user attribute."""
    cfg = trial.user_attrs.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg or "train" not in cfg:
        raise StorageError(
            f"trial {trial.number} of study {study.study_name!r} has no recorded configuration "
            "(user attribute 'config'); was it run by automl-cxr?"
        )
    attrs = dict(study.user_attrs)
    model = ModelConfig.from_dict(dict(cfg["model"]))
    train = TrainConfig.from_dict(dict(cfg["train"]))
    dataset = trial.user_attrs.get("dataset") or attrs.get("dataset")
    if not dataset:
        raise StorageError(f"study {study.study_name!r} does not record its dataset")
    classes = list(attrs.get("classes") or (trial.user_attrs.get("metrics") or {}).get("classes"))
    seed = attrs.get("seed")
    return TrialSpec(
        study_name=study.study_name,
        storage=storage_url(storage) if storage else "",
        number=trial.number,
        model=model,
        train=train,
        classes=classes,
        positive=attrs.get("positive"),
        dataset=str(dataset),
        dataset_hash=trial.user_attrs.get("dataset_hash") or attrs.get("dataset_hash"),
        objectives=list(attrs.get("objectives") or [attrs.get("metric", "balanced_accuracy")]),
        values=[float(v) for v in (trial.values or [])],
        profile=dict(attrs.get("profile") or {}),
        seed=int(seed if seed is not None else train.seed),
        params=dict(trial.params),
        user_attrs=dict(trial.user_attrs),
        study_attrs=attrs,
    )


def training_data(spec: TrialSpec, data_dir: str | Path) -> PreparedDataset:
    """The exact images the trial was trained and evaluated on: the prepared dataset less the
    study's test split (if any), subsampled as the study's profile did (`max_per_class`,
    seed). Its content hash must equal the one the trial recorded, or a DataError says what
    changed."""
    return search_split(spec, data_dir)[0]


def search_split(
    spec: TrialSpec, data_dir: str | Path
) -> tuple[PreparedDataset, PreparedDataset | None]:
    """(`training_data`, the study's test split from `search --test` or None), split once."""
    full = load_dataset(spec.dataset, data_dir)
    max_per_class = spec.profile.get("max_per_class")
    test = ((spec.study_attrs.get("protocol") or {}).get("test") or {}).get("spec")
    candidates = []
    for seed in dict.fromkeys((spec.seed, spec.train.seed)):
        ds, held, _ = search_data(full, max_per_class, seed, test)
        if spec.dataset_hash is None or ds.hash == spec.dataset_hash:
            return ds, held
        candidates.append(ds.hash[:12])
    raise DataError(
        f"the prepared dataset {spec.dataset!r} in {data_dir} is not the data study "
        f"{spec.study_name!r} was run on: its content hash (after the profile's subsampling) is "
        f"{', '.join(candidates)}, the study recorded {str(spec.dataset_hash)[:12]}. Prepare the "
        "same data again, or point --data-dir at the data the study used"
    )


def pin_segmenter(
    spec: TrialSpec, data_dir: str | Path, *, any_segmenter: bool = False
) -> str | None:
    """Point `spec.train` at the lung segmenter the trial was searched with (its recorded
    preprocessing key names it): the copy the study keeps in its artifact folder, or the data
    folder's when it is the same file. A DataError when neither is (retraining with other lung
    masks would not be the model the search scored), unless `any_segmenter`: then the data
    folder's is used and a warning returned. No-op for trials without a roi lever or recorded
    before the key was."""
    if spec.train.roi == "full":
        return None
    recorded = str((spec.user_attrs.get("preprocess") or {}).get("key") or "")
    if "lungs:" not in recorded:
        return None
    from automl_cxr.lungs import load_segmenter, segmenter_path, study_segmenter
    from automl_cxr.oof import artifact_dir

    want = recorded[recorded.index("lungs:") :]
    where = artifact_dir(spec.storage) if spec.storage else None
    here = segmenter_path(spec.train, data_dir)
    keys: dict[Path, str] = {}  # the segmenters found, by path
    for path in ([study_segmenter(where, want)] if where else []) + [here]:
        if path.is_file():
            keys[path] = load_segmenter(path).key
            if keys[path] == want:
                spec.train = replace(spec.train, segmenter=str(path))
                return None
    found = "; ".join(f"{path} is {key}" for path, key in keys.items())
    what = (
        f"trial {spec.number} was searched with lung segmenter {want}, but "
        + (found or f"there is none at {here}")
        + " and the study keeps no copy of its own (studies before 2026-12-07 did not)"
    )
    if any_segmenter and here in keys:
        return (
            f"{what}: retrained with {keys[here]} (--any-segmenter), so its lung masks, and "
            "the model, differ from the ones the search scored"
        )
    raise DataError(
        f"{what}: retraining it would compute other lung masks than the search scored. Put "
        f"that segmenter back at {here}, search again, or pass --any-segmenter to retrain "
        "with the data folder's one anyway"
    )
