"""Dead and failed trials: recognise a trial whose worker died, mark it FAIL, re-run its
parameters (a bounded number of times); stop a search whose every recent trial failed."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

from automl_cxr._compat.optuna import fail_stale_trials, storage_of, trial_id

__all__ = [
    "MAX_FAILED_IN_A_ROW",
    "MAX_RETRIES",
    "enqueue_retry",
    "PROCESS_ID",
    "last_fail_reason",
    "process_record",
    "process_state",
    "reconcile_dead_trials",
    "retry_transient",
    "too_many_failures",
    "worker_record",
]

MAX_RETRIES = 2
"""A trial that failed transiently (I/O, lost worker) is re-run with the same parameters at
most this many times."""
MAX_FAILED_IN_A_ROW = 5
"""This many failed trials in a row stop the search (`SearchAborted`) instead of burning time."""
DIED = "worker process died (killed or crashed)"


def worker_record() -> dict:
    """Who runs a trial, for people: this host and process id (user attribute `worker`)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


PROCESS_ID = uuid.uuid4().hex
"""This process's id, unique across hosts and containers (a forked child gets a new one)."""


def _new_process_id() -> None:
    global PROCESS_ID
    PROCESS_ID = uuid.uuid4().hex


os.register_at_fork(after_in_child=_new_process_id)


def process_record() -> dict:
    """Who runs a trial, for dead-trial detection (user attribute `process`): a per-process id,
    and what tells from this host whether that process still runs. A host name alone is not
    enough: containers can share one and still have separate PID namespaces (the same pid is
    then another process, or none)."""
    return {
        "id": PROCESS_ID,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
        "boot_id": _boot_id(),
        "pid_start": _pid_start(os.getpid()),
    }


def process_state(record: dict, *, host: str | None = None) -> str:
    """`"alive"`, `"dead"` or `"unknown"` (another host or PID namespace: heartbeats decide) for
    the process a trial's `process` record (or an older study's `worker` record) names."""
    if "id" in record:
        if record["id"] == PROCESS_ID:
            return "dead"  # our own trial, left RUNNING by an earlier call in this process
    elif int(record.get("pid", -1)) == os.getpid():
        return "dead"
    if record.get("host") != (host or socket.gethostname()):
        return "unknown"
    if "id" in record:  # the same host name is not yet the same machine and PID namespace
        boot = _boot_id()
        if record.get("boot_id") is None or boot is None:
            return "unknown"
        if record["boot_id"] != boot:
            return "dead"  # this machine rebooted since: every process of then is gone
        ns = record.get("pid_namespace")
        if ns is None or ns != _pid_namespace():
            return "unknown"  # another container: its pids mean nothing here
    pid = int(record.get("pid", -1))
    if not _pid_alive(pid):
        return "dead"
    started = record.get("pid_start")
    if started is not None and _pid_start(pid) not in (None, started):
        return "dead"  # the pid now belongs to another process
    return "alive"


def reconcile_dead_trials(study: optuna.Study, *, host: str | None = None) -> list[int]:
    """RUNNING trials whose worker process is known to be gone → FAIL, re-enqueued.

    Known from this host (`process_state`, from the `process` record of each trial); for trials
    of other hosts or containers Optuna's heartbeats decide: stale after the storage's grace
    period → FAIL, re-queued by the storage's stale-trial callback.
    """
    fail_stale_trials(study)
    failed = []
    storage = storage_of(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = t.user_attrs.get("process") or t.user_attrs.get("worker") or {}
        if process_state(record, host=host) != "dead":
            continue
        try:
            storage.set_trial_user_attr(trial_id(t), "fail_reason", DIED)
            storage.set_trial_user_attr(trial_id(t), "fail_kind", "died")
            ok = storage.set_trial_state_values(trial_id(t), TrialState.FAIL)
        except Exception:  # another worker got there first
            continue
        if ok:
            failed.append(t.number)
            enqueue_retry(study, t)
    return failed


def enqueue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Re-run a failed trial's parameters (bounded by MAX_RETRIES along a retry chain)."""
    retries = int(trial.user_attrs.get("retries", 0))
    if retries >= MAX_RETRIES or not trial.params:
        return False
    study.enqueue_trial(
        trial.params,
        user_attrs={"retry_of": trial.number, "retries": retries + 1},
        skip_if_exists=False,
    )
    return True


def retry_transient(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A `study.optimize` callback: a trial that failed transiently is re-run."""
    if trial.state == TrialState.FAIL and trial.user_attrs.get("fail_kind") == "transient":
        enqueue_retry(study, trial)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_namespace() -> int | None:
    """The inode of this process's PID namespace (Linux), else None."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 of proc(5); fields[0] is its field 3


def too_many_failures(study: optuna.Study, before: int, window: int = MAX_FAILED_IN_A_ROW) -> bool:
    """Whether the last `window` trials since trial index `before` all failed."""
    new = study.get_trials(deepcopy=False)[before:]
    if len(new) < window:
        return False
    return all(t.state == TrialState.FAIL for t in new[-window:])


def last_fail_reason(study: optuna.Study) -> str:
    """The `fail_reason` of the most recent failed trial that has one."""
    with contextlib.suppress(Exception):
        for t in reversed(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))):
            r = t.user_attrs.get("fail_reason")
            if r:
                return str(r)
    return "unknown"
