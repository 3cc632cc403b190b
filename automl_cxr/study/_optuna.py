"""The Optuna pieces both backends share: finished states, sampler and pruner factories, the
sampler's seed, and the sampler wrapper that tags each trial with its worker."""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import TrialState

from automl_cxr.study._compat import storage_of, trial_id
from automl_cxr.study._recovery import worker_record

__all__ = [
    "FINISHED",
    "PRUNERS",
    "SAMPLERS",
    "WorkerTaggingSampler",
    "finished_count",
    "make_pruner",
    "make_sampler",
    "sampler_seed",
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
    created, so a trial whose process is killed can be recognised at once by the next run."""

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        storage_of(study).set_trial_user_attr(trial_id(trial), "worker", worker_record())
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
    """`--sampler` as an Optuna sampler (NSGA-II for several objectives)."""
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
    """`--pruner` as an Optuna pruner; `max_resource` = epochs x folds of the profile."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, max_resource))


def sampler_seed(seed: int, worker_index: int = 0, n_existing: int = 0) -> int:
    """The sampler's seed for a run that starts with `n_existing` trials in the study: `seed`
    itself for a fresh single-process study (same seed, same parameters), otherwise a value
    derived from all three, so that resumed runs and parallel workers draw new points."""
    if worker_index == 0 and n_existing == 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed), worker_index, n_existing]).generate_state(1)[0])
