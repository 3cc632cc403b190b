"""`--backend ray`: the Tune schedulers (`--scheduler`), which also note what the driver
needs to know: the trials a scheduler stopped (→ PRUNED) and each errored trial's Ray error."""

from __future__ import annotations

from typing import Any

from automl_cxr._compat.ray import trial_error
from automl_cxr.errors import ConfigError
from automl_cxr.study._profiles import Profile
from automl_cxr.study._ray._worker import FINAL, METRIC, STEP
from automl_cxr.study._settings import SearchSettings
from automl_cxr.study._setup import pruning_budget
from automl_cxr.study._space import SearchSpace

__all__ = ["SCHEDULERS", "RecordingASHA", "RecordingFIFO", "make_scheduler", "max_steps"]

SCHEDULERS = ("asha", "fifo")
"""`--scheduler` values: `asha` stops weak trials early; `fifo` (or none) never stops one."""


def make_scheduler(
    name: str | None, settings: SearchSettings, profile: Profile, space: SearchSpace
):
    """The Tune scheduler for `--scheduler` (None for FIFO), validated before Ray starts."""
    if name is None or name == "fifo":
        return None
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    if len(settings.objectives) > 1:
        raise ConfigError(
            f"scheduler {name!r} needs a single objective (trials report no intermediate "
            f"values in multi-objective studies), but got objectives={settings.objectives}"
        )
    return RecordingASHA(
        time_attr=STEP,
        metric=METRIC,
        mode="max",
        max_t=max_steps(profile, space),
        grace_period=1,
    )


def max_steps(profile: Profile, space: SearchSpace) -> int:
    """Most intermediate values a trial can report: epochs (the space's largest) × folds —
    the same budget the local pruner gets (`pruning_budget`)."""
    return pruning_budget(profile, space)


try:  # the classes below subclass Ray's; keep `import automl_cxr.study._ray` cheap otherwise
    from ray.tune.schedulers import AsyncHyperBandScheduler as _ASHA
    from ray.tune.schedulers import FIFOScheduler as _FIFO
except ImportError:  # pragma: no cover - ray is a dependency
    _ASHA = _FIFO = object  # type: ignore[assignment,misc]


class _NotingErrors:
    """Keeps each errored trial's Ray error for the driver: Tune tells the scheduler, with the
    trial, just before it tells the searcher, with only the trial's id."""

    errors: dict[str, BaseException | None]
    stopped: set[str]

    def on_trial_error(self, tune_controller, trial) -> None:
        self.errors[trial.trial_id] = trial_error(trial)
        super().on_trial_error(tune_controller, trial)  # type: ignore[misc]


class RecordingFIFO(_NotingErrors, _FIFO):
    """First in, first out (Tune's default), noting errors."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: set[str] = set()
        self.errors = {}


class RecordingASHA(_NotingErrors, _ASHA):
    """ASHA that remembers which trials it stopped (so they become PRUNED, not COMPLETE)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopped: set[str] = set()
        self.errors = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and not result.get(FINAL):
            self.stopped.add(trial.trial_id)
        return decision
