"""Optuna storage from a path or URL: SQLite by default, RDB URLs, journal files."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from automl_cxr._compat.optuna import journal_file, wrapped_storage
from automl_cxr.errors import MissingDependency, StorageError

__all__ = [
    "HEARTBEAT_INTERVAL",
    "close_storage",
    "load_study",
    "open_storage",
    "storage_location",
    "storage_url",
    "study_names",
]

_DRIVERS = {"postgresql": ("psycopg[binary]", "postgres"), "mysql": ("PyMySQL", "mysql")}
"""Database URL scheme → (driver package, the automl-cxr extra that installs it)."""
_FALLBACK_DRIVERS = {
    "postgresql": (("psycopg", "postgresql"), ("psycopg2", "postgresql+psycopg2")),
    "mysql": (("MySQLdb", "mysql"), ("pymysql", "mysql+pymysql")),
}
"""A URL without a driver (`postgresql://`, `mysql://`) is opened with SQLAlchemy's default
driver when installed, else with the next one that is (the extras install the pure-Python or
binary wheels: psycopg 3 / psycopg2, PyMySQL)."""


def _with_installed_driver(url: str) -> str:
    import importlib.util

    scheme, sep, rest = url.partition("://")
    for module, dialect in _FALLBACK_DRIVERS.get(scheme, ()):
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}{sep}{rest}"
    return url


HEARTBEAT_INTERVAL = 10
GRACE_PERIOD = 30
MAX_RETRY = 2


def storage_url(storage: str | Path) -> str:
    """A bare path means SQLite (`studies/x.db` → `sqlite:////abs/studies/x.db`)."""
    s = str(storage)
    if "://" in s:
        return s
    if s.endswith((".log", ".journal", ".jsonl")):
        return "journal:" + str(Path(s).resolve())
    return "sqlite:///" + str(Path(s).resolve())


def open_storage(storage: str | Path, *, create: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage with heartbeats (a trial whose process died becomes FAIL and is
    retried) and, on SQLite, a long busy timeout so concurrent workers wait instead of failing
    with "database is locked"."""
    url = storage_url(storage)
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        if not create and not path.is_file():
            raise StorageError(f"study storage not found: {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise StorageError(f"cannot open journal storage {path}: {exc}") from None
    engine_kwargs: dict = {}
    url = _with_installed_driver(url)
    if url.startswith("sqlite:"):
        path = Path(url.removeprefix("sqlite:///"))
        if not create and not path.is_file():
            raise StorageError(f"study storage not found: {path} (no such file)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder for {path}: {exc}") from None
        engine_kwargs = {"connect_args": {"timeout": 120}}
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = {
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRY
                )
            }
    else:  # pragma: no cover - older optuna
        retry = {
            "failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)
        }
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
                **retry,
            )
        if url.startswith("sqlite:"):
            _fast_sqlite(storage)
        return storage
    except ImportError as exc:  # the URL's database driver is not installed
        scheme = url.split("://", 1)[0].split("+", 1)[0]
        if scheme in _DRIVERS:
            package, extra = _DRIVERS[scheme]
            raise MissingDependency(package, extra, f"a {scheme}:// storage") from None
        raise StorageError(f"cannot open storage {url!r}: {exc}") from None
    except Exception as exc:  # sqlalchemy raises many kinds; name the URL, no traceback
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot open storage {url!r}: {msg}") from None


def _fast_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal and synchronous=NORMAL: a commit no longer waits for fsync (each trial
    writes ~50 rows), readers never block the writer, and a killed process still leaves a
    consistent file (only a power cut can lose the last commits). WAL needs a local disk, not
    NFS: use PostgreSQL or a journal file there."""
    from sqlalchemy import event

    def on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # pooled connections reconnect with the pragmas


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Fold a SQLite file's write-ahead log back into it and close the connections, so the
    `.db` file alone holds the whole study (safe to copy) when a command ends."""
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name != "sqlite":
        return
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception:  # another process holds the file: it checkpoints when it closes
        pass
    engine.dispose()


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage: str | Path, study_name: str | None = None) -> optuna.Study:
    """An existing study from a SQLite path or storage URL.

    With one study in the storage it is chosen automatically; with several, `study_name` must
    name one, and the error lists them.
    """
    backend = open_storage(storage, create=False)
    url = storage_url(storage)
    try:
        names = study_names(backend)
    except Exception as exc:  # a file that is not an Optuna database, a broken URL, ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot read studies from {url!r}: {msg}") from None
    if not names:
        raise StorageError(f"no study in {url!r}: run `automl-cxr search` first")
    if study_name is None:
        if len(names) > 1:
            raise StorageError(
                f"{len(names)} studies in {url!r}; choose one with --study-name: "
                f"{', '.join(sorted(names))}"
            )
        study_name = names[0]
    elif study_name not in names:
        raise StorageError(
            f"no study named {study_name!r} in {url!r}; the studies there: "
            f"{', '.join(sorted(names))}"
        )
    return optuna.load_study(study_name=study_name, storage=backend)


def storage_location(storage: Any) -> str | None:
    """The storage URL (``sqlite:///…``, ``journal:…``) of an Optuna storage object."""
    path = journal_file(storage)
    if path is not None:
        return "journal:" + str(Path(path).resolve())
    inner = wrapped_storage(storage)  # a cached or journal storage around its backend
    if inner is not None:
        found = storage_location(inner)
        if found is not None:
            return found
    url = getattr(storage, "url", None)  # RDBStorage's public URL
    return url if isinstance(url, str) else None
