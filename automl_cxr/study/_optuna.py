"""The Optuna pieces both backends share: finished states, sampler and pruner factories, the
per-trial seeds, and the sampler wrapper that tags each trial with its worker."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from automl_cxr._compat.optuna import one_read, storage_of, trial_id
from automl_cxr.study._recovery import process_record, worker_record

__all__ = [
    "FINISHED",
    "PRUNERS",
    "SAMPLERS",
    "WorkerTaggingSampler",
    "finished_count",
    "make_pruner",
    "make_sampler",
    "study_sampler",
    "trial_seed",
]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""States that count towards `--trials` (failed trials are retried, not counted)."""
SAMPLERS = ("tpe", "random", "nsga2")
PRUNERS = ("hyperband", "median", "none")


def finished_count(study: optuna.Study) -> int:
    """How many trials count towards `--trials`."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class WorkerTaggingSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler and records the worker (see `worker_record`) on each trial as it is
    created, so a trial whose process is killed can be recognised at once by the next run.

    With `factory`, each trial gets its own inner sampler, `factory(trial.number)`: seeded by
    the trial's number, so that parallel workers, resumed runs and separate machines started
    with one seed never draw the same configuration for two trials (and a fresh study with the
    same seed draws the same parameters).
    """

    def __init__(
        self,
        inner: optuna.samplers.BaseSampler,
        factory: Callable[[int], optuna.samplers.BaseSampler] | None = None,
    ) -> None:
        self.inner = inner
        self.factory = factory
        self._by_number: dict[int, optuna.samplers.BaseSampler] = {}
        self._reads: dict[tuple[int, int], optuna.Study] = {}

    def _for(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.BaseSampler:
        if self.factory is None:
            return self.inner
        sampler = self._by_number.get(trial.number)
        if sampler is None:
            sampler = self._by_number[trial.number] = self.factory(trial.number)
        return sampler

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        storage = storage_of(study)
        storage.set_trial_user_attr(trial_id(trial), "worker", worker_record())
        storage.set_trial_user_attr(trial_id(trial), "process", process_record())
        self._for(trial).before_trial(study, trial)

    # Relative sampling (the search space, then the draw) sees one read of the trials
    # (`one_read`), not one per parameter group; so does each independent draw.
    def _one_read(self, study, trial, *, keep: bool):
        key = (trial.number, id(study))
        read = self._reads.pop(key, None) or one_read(study)
        if keep:
            self._reads = {key: read}
        return read

    def infer_relative_search_space(self, study, trial):
        read = self._one_read(study, trial, keep=True)
        return self._for(trial).infer_relative_search_space(read, trial)

    def sample_relative(self, study, trial, search_space):
        read = self._one_read(study, trial, keep=False)
        return self._for(trial).sample_relative(read, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(
            one_read(study), trial, param_name, param_distribution
        )

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._by_number.pop(trial.number, None)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def study_sampler(name: str, seed: int, *, multi: bool) -> WorkerTaggingSampler:
    """The sampler a study runs with: `--sampler`, seeded per trial (`trial_seed`), tagging
    each trial with its worker."""
    return WorkerTaggingSampler(
        make_sampler(name, seed, multi=multi),
        lambda number: make_sampler(name, trial_seed(seed, number), multi=multi),
    )


def make_sampler(name: str, seed: int, *, multi: bool) -> optuna.samplers.BaseSampler:
    """`--sampler` as an Optuna sampler (NSGA-II for several objectives)."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if multi:
        return optuna.samplers.NSGAIISampler(seed=seed)
    # multivariate + group: the head's conditional parameters are modelled together.
    # constant_liar: a trial still running counts as a poor result, so trials sampled while
    # others run (parallel workers, Ray) spread out instead of piling onto one optimum; with one
    # trial at a time nothing else is running and it changes nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, n_startup_trials=5, constant_liar=True
        )


def make_pruner(name: str, max_resource: int) -> optuna.pruners.BasePruner:
    """`--pruner` as an Optuna pruner; `max_resource` = epochs x folds of the profile."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, max_resource))


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial `number` of a study searched with `seed`."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])
