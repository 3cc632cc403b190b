"""What `automl-cxr search` takes (`SearchSettings`, validated on construction) and what it
returns (`SearchSummary`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automl_cxr.engine import CV_MODES, SCALAR_METRICS
from automl_cxr.errors import ConfigError
from automl_cxr.study._optuna import PRUNERS, SAMPLERS
from automl_cxr.study._record import OBJECTIVE_KEYS
from automl_cxr.study._space import SearchSpace

__all__ = ["BACKENDS", "SearchSettings", "SearchSummary"]

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
    workers: int | None = None  # None: the profile's (`profile_workers`)
    cpu_amp: bool | None = None  # bfloat16 autocast on a bf16-capable CPU; None: the profile's
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
    cv: str = "patient"  # what a fold holds out: patients, or whole acquisition sites
    externals: Sequence[str | Path] = ()  # external sets scored after each COMPLETE trial
    external_label_map: Mapping[str, str] | None = None  # their labels onto the study's
    drop_overlap: bool = False  # leave out external images that overlap the training data
    test: str | None = None  # "patient:F" / "site:F": a test split the search never sees
    trial_timeout: float | None = None  # seconds; a trial running longer fails with the reason
    verbose: bool = False  # Ray's own messages on the console (else in a log file)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials must be at least 1, but got trials={self.trials}")
        if self.workers is not None and self.workers < 1:
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
        if self.cv not in CV_MODES:
            raise ConfigError(f"cv must be one of {list(CV_MODES)}, but got cv={self.cv!r}")
        self.externals = [str(e) for e in self.externals]
        if self.trial_timeout is not None and not self.trial_timeout > 0:
            raise ConfigError(
                f"trial_timeout must be a positive number of seconds, but got "
                f"trial_timeout={self.trial_timeout}"
            )
        if self.test is not None:
            from automl_cxr.study._testsplit import parse_test

            parse_test(self.test)
        dupes = sorted({e for e in self.externals if self.externals.count(e) > 1})
        if dupes:
            raise ConfigError(f"--external names the same set twice: {dupes}")
        if self.external_label_map and not self.externals:
            raise ConfigError("--external-label-map needs at least one --external DIR")
        if self.drop_overlap and not self.externals:
            raise ConfigError("--drop-overlap needs at least one --external DIR")
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
