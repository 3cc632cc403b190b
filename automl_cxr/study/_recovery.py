"""Dead and failed trials: recognise a trial whose worker died, mark it FAIL, re-run its
parameters (a bounded number of times); stop a search whose every recent trial failed."""

from __future__ import annotations

import contextlib
import os
import socket

import optuna
from optuna.trial import TrialState

from automl_cxr.study._compat import storage_of, trial_id

__all__ = [
    "MAX_FAILED_IN_A_ROW",
    "MAX_RETRIES",
    "enqueue_retry",
    "last_fail_reason",
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
    """Who runs a trial: this host and process."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def reconcile_dead_trials(study: optuna.Study, *, host: str | None = None) -> list[int]:
    """Trials RUNNING on this host whose worker process no longer exists → FAIL, re-enqueued.

    Heartbeats do the same across machines after a grace period; this does it at once for the
    common case of a killed local run.
    """
    host = host or socket.gethostname()
    failed = []
    storage = storage_of(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        if w.get("host") != host or _pid_alive(int(w.get("pid", -1))):
            continue
        try:
            storage.set_trial_user_attr(trial_id(t), "fail_reason", DIED)
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
    if pid == os.getpid():
        return False  # our own trial left RUNNING from an earlier call in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
