"""`--backend ray`, the worker's side: one trial in a Ray worker process, through the same
`Objective` code path as the local backend, writing to the study by its storage URL."""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from automl_cxr._compat.optuna import attach_trial, heartbeat_thread
from automl_cxr._storage import open_storage
from automl_cxr.errors import StorageError
from automl_cxr.study._objective import Objective
from automl_cxr.study._optuna import make_pruner
from automl_cxr.study._profiles import Profile
from automl_cxr.study._recovery import process_record, worker_record
from automl_cxr.study._space import SearchSpace
from automl_cxr.study._testsplit import search_data

__all__ = ["FINAL", "METRIC", "STEP", "Job", "trainable"]

METRIC = "value"
"""What trials report to Tune: the validation value of the study's (first) metric."""
STEP = "step"
"""Tune's time attribute for schedulers: Optuna's step (fold * epochs + epoch, from 0)."""
FINAL = "final"
"""Set on a trial's last Tune report, which carries its outcome."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Job:
    """What a Ray worker needs besides the trial id (shipped once through the object store)."""

    storage_url: str
    study_name: str
    dataset: str
    dataset_hash: str
    data_dir: str
    max_per_class: int | None
    seed: int
    space: SearchSpace
    profile: Profile
    objectives: list[str]
    pruner: str
    max_resource: int
    cpus: int
    gpus: float
    feature_cache_bytes: int
    feature_cache_dir: str | None
    cwd: str
    cv: str = "patient"
    externals: tuple[tuple[str, str], ...] = ()  # (name, folder) of each prepared external set
    test: str | None = None  # the search's --test split, drawn here as in the driver
    trial_timeout: float | None = None  # seconds (--trial-timeout)


class _Abandoned(BaseException):
    """The driver finished this trial (e.g. the Tune scheduler stopped it): unwind quietly.

    A BaseException so that the Objective's `except Exception` writes nothing more."""


class _TuneTrial(optuna.trial.Trial):
    """The real, storage-backed Optuna trial; each intermediate value also goes to Tune."""

    def report(self, value: float, step: int) -> None:
        from ray import tune

        try:
            super().report(value, step)
        except UpdateFinishedTrialError:
            raise _Abandoned() from None
        self.last_reported_step = int(step)
        tune.report({METRIC: float(value), STEP: int(step), FINAL: False})

    def set_user_attr(self, key: str, value: Any) -> None:
        try:
            super().set_user_attr(key, value)
        except UpdateFinishedTrialError:
            raise _Abandoned() from None


_PROCESS: dict[str, Any] = {}
"""Per worker process (actors are reused): the loaded dataset and the feature cache."""


def _worker_dataset(job: Job):
    from automl_cxr.data import load_dataset

    key = f"{job.data_dir}|{job.dataset}|{job.max_per_class}|{job.seed}|{job.test}"
    if _PROCESS.get("dataset_key") != key:
        _PROCESS.pop("dataset", None)
        full = load_dataset(job.dataset, Path(job.data_dir))
        dataset, test, _ = search_data(full, job.max_per_class, job.seed, job.test)
        _PROCESS["dataset"], _PROCESS["test"] = dataset, test
        _PROCESS["dataset_key"] = key
    return _PROCESS["dataset"]


def _worker_storage(url: str) -> optuna.storages.BaseStorage:
    if _PROCESS.get("storage_url") != url:
        _PROCESS["storage"] = open_storage(url, create=False)
        _PROCESS["storage_url"] = url
    return _PROCESS["storage"]


def _worker_cache(job: Job):
    from automl_cxr.engine import FeatureCache

    key = f"{job.feature_cache_bytes}|{job.feature_cache_dir}"
    if _PROCESS.get("cache_key") != key:
        _PROCESS["cache"] = FeatureCache(job.feature_cache_bytes, job.feature_cache_dir)
        _PROCESS["cache_key"] = key
    return _PROCESS["cache"]


def _placement(job: Job) -> dict:
    import ray
    from ray import tune

    ctx = ray.get_runtime_context()
    try:
        requested = dict(tune.get_context().get_trial_resources().required_resources)
    except Exception:
        requested = {"CPU": job.cpus, "GPU": job.gpus}
    try:
        accel = {k: [str(i) for i in v] for k, v in ctx.get_accelerator_ids().items() if v}
    except Exception:
        accel = {}
    return {
        "cpus": requested.get("CPU", job.cpus),
        "gpus": requested.get("GPU", job.gpus),
        "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "accelerator_ids": accel,
        "node": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "tune_trial_id": tune.get_context().get_trial_id(),
    }


def trainable(config: dict, job: Job) -> None:
    """One trial on a Ray worker: the same Objective code path as the local backend.

    Never raises for a fault of the trial or of this worker's setup (the study's storage out
    of reach, data missing on this node, ...): the last Tune report carries the outcome, and
    a setup fault its reason (`fail_kind` "setup"), so the driver records what went wrong
    instead of "the worker died".
    """
    import torch
    from ray import tune

    from automl_cxr.study._objective import _free_device_memory

    trial_id = int(config["optuna_trial_id"])
    try:
        if os.path.isdir(job.cwd):
            os.chdir(job.cwd)  # Tune starts trials in their own folder; paths behave as locally
        torch.set_num_threads(max(1, int(job.cpus)))
        storage = _worker_storage(job.storage_url)
        study = optuna.load_study(
            study_name=job.study_name,
            storage=storage,
            # the driver sampled every parameter already; this only answers a fixed-value re-ask
            sampler=optuna.samplers.RandomSampler(seed=job.seed + int(config["optuna_number"])),
            pruner=make_pruner(job.pruner, job.max_resource),
        )
        trial = attach_trial(study, trial_id, _TuneTrial)
    except Exception as exc:  # the study is out of reach from here: only the driver can say
        tune.report(
            {
                METRIC: float("nan"),
                FINAL: True,
                "optuna_state": "FAIL",
                "optuna_values": None,
                "fail_reason": _setup_reason(exc),
                "fail_kind": "setup",
            }
        )
        return
    outcome: dict[str, Any] = {"optuna_state": "FAIL", "optuna_values": None}
    value = float("nan")
    try:
        with heartbeat_thread(trial_id, storage):
            try:
                trial.set_user_attr("worker", {**worker_record(), "started": _now()})
                trial.set_user_attr("process", process_record())
                placement = _placement(job)
                use_cuda = placement["gpus"] > 0 and torch.cuda.is_available()
                placement["device"] = "cuda" if use_cuda else "cpu"
                trial.set_user_attr("ray_resources", placement)
                try:
                    objective = _worker_objective(job, placement["device"])
                except Exception as exc:  # this node's data, cache folder, ...
                    trial.set_user_attr("fail_reason", _setup_reason(exc))
                    trial.set_user_attr("fail_kind", "setup")
                    raise
                plan = objective.sample(trial)  # the driver's values, read back from storage
                values = objective.run_plan(trial, plan)
                vals = list(values) if isinstance(values, tuple) else [values]
                outcome = {"optuna_state": "COMPLETE", "optuna_values": [float(v) for v in vals]}
                value = float(vals[0])
            except optuna.TrialPruned:
                outcome = {"optuna_state": "PRUNED", "optuna_values": None}
            except Exception as exc:  # recorded on the trial; the driver tells FAIL
                if not storage.get_trial(trial_id).user_attrs.get("fail_reason"):
                    trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
                    trial.set_user_attr("fail_traceback", traceback.format_exc()[-4000:])
    except _Abandoned:
        return
    finally:
        _free_device_memory()
    tune.report({METRIC: value, FINAL: True, **outcome})


def _worker_objective(job: Job, device: str) -> Objective:
    dataset = _worker_dataset(job)
    if dataset.hash != job.dataset_hash:
        raise StorageError(
            f"dataset {job.dataset!r} here has hash {dataset.hash[:12]}, the study has "
            f"{job.dataset_hash[:12]}: every node needs the same data under {job.data_dir}"
        )
    return Objective(
        dataset,
        job.space,
        job.profile,
        metrics=job.objectives,
        seed=job.seed,
        device=device,
        feature_cache=_worker_cache(job),
        cv=job.cv,
        externals=_worker_externals(job),
        test=_PROCESS.get("test"),
        trial_timeout=job.trial_timeout,
    )


def _worker_externals(job: Job) -> list:
    from automl_cxr.data import load_dataset

    key = repr(job.externals)
    if _PROCESS.get("externals_key") != key:
        _PROCESS["externals"] = [load_dataset(n, Path(root)) for n, root in job.externals]
        _PROCESS["externals_key"] = key
    return _PROCESS["externals"]


def _setup_reason(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"setup failed on the Ray worker on {socket.gethostname()}: {type(exc).__name__}: {msg}"
