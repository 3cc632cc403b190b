"""The Optuna objective: sample a configuration, run the trial engine, record everything."""

from __future__ import annotations

import gc
import math
import os
import socket
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from automl_cxr._compat.optuna import set_user_attrs
from automl_cxr.data import PreparedDataset
from automl_cxr.engine import (
    SCALAR_METRICS,
    WORST_FOLD_METRICS,
    FeatureCache,
    TrainConfig,
    run_trial,
    scalar_metrics,
)
from automl_cxr.errors import AutomlCxrError, TrialFailed
from automl_cxr.models import ModelConfig, get_backbone, num_stages
from automl_cxr.oof import save_oof
from automl_cxr.study._external import external_attr_key
from automl_cxr.study._profiles import Profile
from automl_cxr.study._record import OBJECTIVE_KEYS, json_safe
from automl_cxr.study._space import SearchSpace

__all__ = ["OBJECTIVE_KEYS", "Objective", "TrialPlan", "json_safe", "subsample"]


def subsample(dataset: PreparedDataset, max_per_class: int | None, seed: int) -> PreparedDataset:
    """At most `max_per_class` images per class, taken by whole split group (patient)."""
    if max_per_class is None:
        return dataset
    rng = np.random.default_rng(seed)
    m = dataset.manifest
    keep: list[int] = []
    for label in dataset.classes:
        rows = m.index[m["label"] == label]
        groups = np.array(sorted(m.loc[rows, "group_id"].unique()))
        rng.shuffle(groups)
        taken: list[int] = []
        by_group = m.loc[rows].groupby("group_id").groups
        for g in groups:
            if len(taken) >= max_per_class:
                break
            taken.extend(int(i) for i in by_group[g])
        keep.extend(taken)
    return dataset.subset(sorted(set(keep)), tag=f"max{max_per_class}-seed{seed}")


class SurplusTrial(Exception):
    """A trial started beyond `--trials` by a worker racing another one (failed, not run)."""


@dataclass
class TrialPlan:
    """A sampled configuration, resolved for one backbone."""

    model: ModelConfig
    train: TrainConfig
    frozen_fraction: float


class Objective:
    """Callable objective for `study.optimize` (and for Ray workers via `run_params`).

    Args:
        dataset: the prepared dataset (already subsampled by the profile if asked).
        space: the search space; `profile` fills every value the space leaves open.
        metrics: the objective(s): metric names (maximised) and/or `latency`/`params` (minimised).
        feature_cache: shared across trials of this process (the main speed lever).
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        space: SearchSpace,
        profile: Profile,
        *,
        metrics: Sequence[str] = ("balanced_accuracy",),
        seed: int = 0,
        device: str = "auto",
        feature_cache: FeatureCache | None = None,
        log: Callable[[str], None] | None = None,
        cv: str = "patient",
        externals: Sequence[PreparedDataset] = (),
        test: PreparedDataset | None = None,
        trial_timeout: float | None = None,
    ) -> None:
        self.dataset = dataset
        self.cv = cv
        self.externals = list(externals)
        self.test = test  # the search's test split: predicted and stored, never scored here
        self.trial_timeout = trial_timeout  # seconds; a longer trial fails (kind "timeout")
        self.space = space
        self.profile = profile
        self.metrics = list(metrics)
        self.seed = seed
        self.device = device
        self.feature_cache = feature_cache if feature_cache is not None else FeatureCache()
        self.log = log
        # Set by the runner's SIGINT handler: every epoch report checks it, so an interrupt
        # whose KeyboardInterrupt Python swallowed (one raised inside a finalizer is only
        # printed) still stops the trial within an epoch.
        self.stop: threading.Event | None = None
        # Local runs set it to --trials: a trial started beyond it is failed as surplus, so a
        # study never holds more finished trials than asked for.
        self.max_trials: int | None = None
        self.primary = next(
            (m for m in self.metrics if m not in OBJECTIVE_KEYS), "balanced_accuracy"
        )

    def _surplus(self, trial: optuna.Trial) -> bool:
        """Whether `max_trials` trials numbered before this one are finished or running (two
        workers that start a trial at the same moment: the later-numbered one is surplus)."""
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        before = trial.study.get_trials(deepcopy=False, states=states)
        return sum(t.number < trial.number for t in before) >= self.max_trials

    # -- sampling -------------------------------------------------------------------------
    def sample(self, trial: optuna.Trial) -> TrialPlan:
        sp, prof = self.space, self.profile
        backbones = list(sp.backbones or prof.backbones)
        backbone = (
            trial.suggest_categorical("backbone", backbones) if len(backbones) > 1 else backbones[0]
        )
        frac = float(sp.frozen_fraction.suggest(trial))
        stages = num_stages(backbone)
        frozen = int(round(frac * stages))
        heads = list(sp.heads)
        head = trial.suggest_categorical("head", heads) if len(heads) > 1 else heads[0]
        head_kwargs = {
            k.split(".", 1)[1]: p.suggest(trial)
            for k, p in ((p.name, p) for p in sp.heads[head].values())
        }
        gray = sp.gray_mode.suggest(trial)
        t = {k: p.suggest(trial) for k, p in sp.train.items()}
        resolution = t.pop("resolution", None)
        if resolution is None:
            resolution = (
                get_backbone(backbone).input_size
                if prof.extra.get("native_resolution")
                else prof.resolution
            )
        # Some stems cannot shrink below a size (Inception's: 75 px); never let a small
        # profile resolution make a trial fail.
        resolution = max(int(resolution), _min_input(backbone))
        train = TrainConfig(
            resolution=int(resolution),
            epochs=int(t.pop("epochs", prof.epochs)),
            batch_size=int(t.pop("batch_size", prof.batch_size)),
            n_folds=prof.n_folds,
            holdout=prof.holdout,
            max_folds=prof.max_folds,
            early_stopping=prof.early_stopping,
            cv=self.cv,
            seed=self.seed,
            device=self.device,
            cpu_amp=bool(t.pop("cpu_amp", prof.cpu_amp)),
            **t,
        )
        model = ModelConfig(
            backbone=backbone,
            num_classes=len(self.dataset.classes),
            frozen_stages=frozen,
            head=head,
            head_kwargs=head_kwargs,
            pretrained=prof.pretrained,
            gray_mode=gray,
        )
        return TrialPlan(model, train, frac)

    def shallowest_frozen(self, backbone: str) -> int | None:
        """The fewest frozen stages this space draws for `backbone` (None when 0): the frozen
        prefix every trial of the backbone shares, whose features are cached first."""
        ff = self.space.frozen_fraction
        if ff.kind == "fixed":
            low = float(ff.value)
        elif ff.kind == "categorical":
            low = float(min(ff.choices))
        else:
            low = float(ff.low)
        depth = int(round(low * num_stages(backbone)))
        return depth or None

    # -- running --------------------------------------------------------------------------
    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        if self.max_trials is not None and self._surplus(trial):
            trial.set_user_attr(
                "fail_reason",
                f"not run: the study already had --trials {self.max_trials} finished or running "
                "trials when this one started (another worker started it at the same moment)",
            )
            trial.set_user_attr("fail_kind", "surplus")  # MaxTrialsCallback then stops
            raise SurplusTrial(f"trial {trial.number} is beyond --trials {self.max_trials}")
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        try:
            plan = self.sample(trial)
        except AutomlCxrError as exc:
            trial.set_user_attr("fail_reason", f"invalid configuration: {exc}")
            raise
        return self.run_plan(trial, plan)

    def run_plan(self, trial: optuna.Trial, plan: TrialPlan) -> float | tuple[float, ...]:
        config = {
            "model": plan.model.to_dict(),
            "train": plan.train.to_dict(),
            "frozen_fraction": plan.frozen_fraction,
            "num_stages": num_stages(plan.model.backbone),
            "profile": self.profile.name,
        }
        set_user_attrs(
            trial,
            {
                "config": json_safe(config),
                "dataset": self.dataset.name,
                "dataset_hash": self.dataset.hash,
            },
        )
        multi = len(self.metrics) > 1
        reference = bool(trial.user_attrs.get("reference"))

        unreported: list[int] = []

        def report(step: int, value: float) -> None:
            if self.stop is not None and self.stop.is_set():
                raise KeyboardInterrupt
            if multi:
                return  # Optuna does not prune multi-objective studies
            if not math.isfinite(value):
                # e.g. a site fold without the positive class has no covid_sensitivity: report
                # nothing for that step (a 0.0 would get the trial pruned), and say so
                unreported.append(int(step))
                trial.set_user_attr("unreported_steps", list(unreported))
                return
            trial.report(value, step)
            if reference:
                return  # a queued reference configuration runs to the end
            if trial.should_prune():
                trial.set_user_attr("fail_reason", None)
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"pruned at step {step} ({self.primary}={value:.4f})")

        try:
            result = run_trial(
                self.dataset,
                plan.model,
                plan.train,
                metric=self.primary,
                report=report,
                feature_cache=self.feature_cache,
                externals=self.externals,
                test=self.test,
                log=self.log,
                share_from=self.shallowest_frozen(plan.model.backbone),
                time_limit=self.trial_timeout,
            )
        except TrialFailed as exc:
            trial.set_user_attr("fail_reason", exc.reason)
            trial.set_user_attr("fail_kind", exc.kind)
            raise
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C / SIGINT)")
            trial.set_user_attr("fail_kind", "interrupted")
            raise
        except Exception as exc:
            if _is_oom(exc):
                _free_device_memory()
                trial.set_user_attr(
                    "fail_reason",
                    f"out of memory at batch size {plan.train.batch_size}, "
                    f"resolution {plan.train.resolution}",
                )
                trial.set_user_attr("oom_batch_size", plan.train.batch_size)
                raise optuna.TrialPruned("out of memory") from None
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            trial.set_user_attr("fail_kind", "transient" if _is_transient(exc) else "error")
            trial.set_user_attr("fail_traceback", traceback.format_exc()[-4000:])
            raise
        finally:
            _free_device_memory()
        self.record(trial, result)
        try:  # out-of-fold (and test) predictions; the trial's scores stand without them
            save_oof(trial, result, self.dataset, self.test)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("oof", {"stored": False, "reason": f"saving failed: {why}"})
            if self.log:
                self.log(
                    f"warning: trial {trial.number}: out-of-fold predictions not stored ({why})"
                )
        values = []
        for m in self.metrics:
            if m in OBJECTIVE_KEYS:
                values.append(float(getattr(result, OBJECTIVE_KEYS[m])))
            else:
                values.append(float(result.summary["metrics"][m]["mean"]))
        return tuple(values) if multi else values[0]

    @staticmethod
    def record(trial: optuna.Trial, result: Any) -> None:
        """The stable user attributes (see README): fold means, the full record, costs; written
        in one transaction where the storage allows (`set_user_attrs`)."""
        means = {k: v["mean"] for k, v in result.summary["metrics"].items()}
        attrs: dict[str, Any] = {key: means[key] for key in SCALAR_METRICS if key in means}
        for key in WORST_FOLD_METRICS:
            if key in means:
                attrs[key] = means[key]
        attrs["metrics"] = {
            "summary": result.summary,
            "folds": result.folds,
            "pooled": result.pooled,
            "by_source": result.by_source,
            "roc": result.roc,
            "curves": result.curves,
            "splits": result.splits,
            "classes": result.classes,
            "external": result.external,
            "warnings": result.warnings,
        }
        # External sets: recorded for the report, never an objective, a pruning value or a rank.
        for name, ext in (result.externals or {}).items():
            for key, value in scalar_metrics(ext["metrics"]).items():
                attrs[external_attr_key(name, key)] = value
        if result.externals:
            attrs["externals"] = result.externals
        attrs["full_fit_epochs"] = int(result.full_fit_epochs)
        attrs["confusion_matrix"] = result.summary.get("confusion_matrix")
        for key in (
            "params_total",
            "params_trainable",
            "latency_ms",
            "train_seconds",
            "images_per_second",
            "device",
            "precision",
        ):
            attrs[key] = getattr(result, key)
        attrs["feature_cache"] = result.feature_cache
        attrs["timing"] = result.timing
        attrs["weight_source"] = result.weight_source
        attrs["preprocess"] = result.preprocess
        attrs["fail_reason"] = None
        set_user_attrs(trial, json_safe(attrs))


_MIN_INPUT_BY_FAMILY = {"inception": 75}


def _min_input(backbone: str) -> int:
    """The smallest input size a backbone accepts (its stem's reduction), 32 px at least."""
    return max(32, _MIN_INPUT_BY_FAMILY.get(get_backbone(backbone).family, 32))


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _is_transient(exc: BaseException) -> bool:
    """Faults worth a retry: I/O and connection errors, lost CUDA contexts."""
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in msg for s in ("cuda error: unspecified launch failure", "nccl", "connection reset")
    )


def _free_device_memory() -> None:
    """Return a finished trial's CUDA memory to the driver (cycles first, then the caching
    allocator). Without CUDA in use there is nothing to return: a full `gc.collect()` costs
    ~0.3 s per trial in a long study and Python's own collector reclaims cycles anyway."""
    try:
        import torch

        if not torch.cuda.is_initialized():
            return
        gc.collect()
        torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass
