"""Every use of Optuna's and optuna-dashboard's private API, in one place (checked against the
bound in pyproject), below every layer that needs one (oof, study, report).

Each helper names what it reaches into. When Optuna changes one of these, only this module
changes; the upper bound on `optuna` in `pyproject.toml` is raised after the tests pass here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sqlite3
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

import optuna

__all__ = [
    "attach_trial",
    "enqueued_params",
    "dashboard_artifact",
    "dashboard_note",
    "journal_file",
    "study_id",
    "fail_stale_trials",
    "heartbeat_enabled",
    "heartbeat_thread",
    "one_read",
    "record_heartbeat",
    "set_user_attrs",
    "storage_of",
    "trial_id",
    "wrapped_storage",
]

_T = TypeVar("_T", bound=optuna.trial.Trial)


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage. Private: `Study._storage` (no public accessor; needed to write a
    trial's attributes or state by id from another process than the one that asked for it)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage-wide study id. Private: `Study._study_id` (needed for study system
    attributes, which have no public setter)."""
    return study._study_id


def journal_file(storage: Any) -> str | None:
    """The log file of a journal storage, or None. Private: `JournalFileBackend._file_path`."""
    path = getattr(storage, "_file_path", None)
    return path if isinstance(path, str) else None


def wrapped_storage(storage: Any) -> Any | None:
    """The backend a storage wraps (`_CachedStorage`, `JournalStorage`), or None. Private:
    their `_backend`."""
    return getattr(storage, "_backend", None)


def dashboard_note(study: optuna.Study, trial: optuna.trial.FrozenTrial, body: str) -> None:
    """optuna-dashboard's `save_note` on a finished trial. Its public signature wants a live
    `Trial`; it reads only `.storage`, `.study` and the private `_trial_id`, so a stand-in
    with those three serves a FrozenTrial."""
    from types import SimpleNamespace

    from optuna_dashboard import save_note

    save_note(
        SimpleNamespace(storage=storage_of(study), study=study, _trial_id=trial_id(trial)), body
    )


def dashboard_artifact(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, artifact_id: str, meta: Mapping[str, Any]
) -> None:
    """List a stored file under a finished trial in optuna-dashboard: its own study system
    attribute (`dashboard:artifacts:<trial id>:<artifact id>`), the key its artifact view reads;
    Optuna's public `upload_artifact` keeps its records under other keys."""
    key = f"dashboard:artifacts:{trial_id(trial)}:{artifact_id}"
    storage_of(study).set_study_system_attr(study_id(study), key, json.dumps(dict(meta)))


def enqueued_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The parameter values `Study.enqueue_trial` fixed for a trial that has not sampled them
    yet. Private: the `fixed_params` system attribute (no public accessor)."""
    return dict(trial.system_attrs.get("fixed_params", {}))


def trial_id(trial: optuna.trial.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage-wide trial id (not `trial.number`). Private: `Trial._trial_id` /
    `FrozenTrial._trial_id` (the public API exposes only the per-study number)."""
    return trial._trial_id


def attach_trial(study: optuna.Study, tid: int, cls: type[_T] = optuna.trial.Trial) -> _T:
    """A live, storage-backed trial object for an existing RUNNING trial (a Ray worker runs the
    trial the driver asked for). Semi-private: Optuna documents `Trial(study, trial_id)` as not
    meant for direct use (`study.ask()` is the public way to *create* one)."""
    return cls(study, tid)


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    """Private: `optuna.storages._heartbeat.is_heartbeat_enabled`."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def heartbeat_thread(tid: int, storage: optuna.storages.BaseStorage):
    """A context manager beating for `tid` while a trial runs outside `study.optimize`.
    Private: `optuna.storages._heartbeat.get_heartbeat_thread` (what `optimize` uses)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(tid, storage)


def record_heartbeat(storage: optuna.storages.BaseStorage, tid: int) -> None:
    """One heartbeat for `tid` (a trial queued in Ray has no worker thread yet); no-op where
    heartbeats are off. Private: `BaseHeartbeat.record_heartbeat` lives in
    `optuna.storages._heartbeat`."""
    if heartbeat_enabled(storage):
        with contextlib.suppress(Exception):
            storage.record_heartbeat(tid)


def fail_stale_trials(study: optuna.Study) -> None:
    """Trials whose heartbeat stopped → FAIL (and, through the storage's stale-trial
    callback, re-queued). Public (`optuna.storages.fail_stale_trials`) but experimental, and
    only meaningful where the private heartbeat check says heartbeats are on."""
    if not heartbeat_enabled(storage_of(study)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        optuna.storages.fail_stale_trials(study)


def set_user_attrs(trial: optuna.trial.Trial, attrs: Mapping[str, Any]) -> None:
    """Several user attributes of a live trial at once: on an RDB storage one multi-row upsert
    in one transaction (~4 ms for a complete trial's ~25 attributes on SQLite, against ~20 ms
    for one `set_user_attr` per key), else one by one. Private: `_CachedStorage._backend`,
    `optuna.storages._rdb.models`, `optuna.storages._rdb.storage._create_scoped_session`,
    `RDBStorage.check_trial_is_updatable` / `_set_trial_attr_without_commit` (whose upsert this
    writes for several rows) and `Trial._cached_frozen_trial` (kept in step with the storage,
    as `Trial.set_user_attr` does)."""
    storage = getattr(trial, "storage", None)  # a FixedTrial has none
    inner = wrapped_storage(storage)
    backend = storage if inner is None else inner
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        write_one = backend._set_trial_attr_without_commit
        cached = trial._cached_frozen_trial.user_attrs
    except (ImportError, AttributeError):
        write_one = None
    if write_one is None or not isinstance(backend, optuna.storages.RDBStorage) or not attrs:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    tid, model = trial._trial_id, models.TrialUserAttributeModel
    stmt = _upsert(backend.engine.name, model, tid, attrs)
    with _create_scoped_session(backend.scoped_session, True) as session:
        if stmt is None:  # another database: Optuna's own per-row write, one commit
            for key, value in attrs.items():
                write_one(session, model, tid, key, value)
        else:
            row = models.TrialModel.find_or_raise_by_id(tid, session)
            backend.check_trial_is_updatable(tid, row.state)
            session.execute(stmt)
    cached.update(attrs)


def _upsert(dialect: str, model: Any, tid: int, attrs: Mapping[str, Any]) -> Any:
    """INSERT … ON CONFLICT (trial_id, key) UPDATE value_json for every attribute, in the
    dialects Optuna itself upserts in; None for others."""
    rows = [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    if dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "mysql":
        from sqlalchemy.dialects.mysql import insert

        stmt = insert(model).values(rows)
        return stmt.on_duplicate_key_update(value_json=stmt.inserted.value_json)
    else:
        return None
    stmt = insert(model).values(rows)
    return stmt.on_conflict_do_update(
        index_elements=[model.trial_id, model.key], set_={"value_json": stmt.excluded.value_json}
    )


class _OneRead:
    """`study` as one read of its trials: what a sampler sees during one call. Private:
    `Study._get_trials` (what Optuna's samplers read trials through)."""

    def __init__(self, study: optuna.Study) -> None:
        self._inner = study
        self._trials: list[optuna.trial.FrozenTrial] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        if self._trials is None:
            self._trials = self._inner._get_trials(deepcopy=False)
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy, states)


def one_read(study: optuna.Study) -> optuna.Study:
    """`study` for one sampler call, reading its trials from the storage once. TPE with
    `constant_liar` reads them afresh for every parameter group (it must see trials other
    workers are running), ~6 ms each on SQLite; within one call one consistent read is as
    good."""
    return _OneRead(study)  # type: ignore[return-value]
