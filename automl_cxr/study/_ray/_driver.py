"""`--backend ray`, the driver's side: the Tune searcher that asks the Optuna study for each
trial (sampling in the driver, so one sampler sees every trial) and tells it the outcome."""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from automl_cxr._compat.optuna import (
    fail_stale_trials,
    heartbeat_enabled,
    record_heartbeat,
    storage_of,
)
from automl_cxr._compat.optuna import trial_id as _tid
from automl_cxr._storage import HEARTBEAT_INTERVAL
from automl_cxr.errors import AutomlCxrError, SearchAborted
from automl_cxr.study._objective import Objective
from automl_cxr.study._ray._worker import FINAL, METRIC, STEP
from automl_cxr.study._recovery import (
    MAX_FAILED_IN_A_ROW,
    enqueue_retry,
    last_fail_reason,
    worker_record,
)

__all__ = [
    "DRIVERS",
    "HUNG_GRACE",
    "RETRIED",
    "AskTellSearcher",
    "Driver",
    "Live",
    "describe_tune_error",
]

HUNG_GRACE = 120.0
"""Seconds past `--trial-timeout` after which the driver gives a silent trial up as hung."""
RETRIED = ("transient", "died")
"""`fail_kind`s whose trial is re-run with the same parameters (at most `MAX_RETRIES` times)."""
DIED = (
    "the Ray worker running this trial died (out of host memory, a crash, or a lost node); "
    "see the Ray logs"
)


def describe_tune_error(exc: BaseException | None) -> tuple[str, str]:
    """`fail_reason` and `fail_kind` for a Tune trial that errored: an exception raised by the
    worker's own Python code outside the trial, such as an import error on that node ("setup",
    reported as it is); anything else, i.e. Ray losing the worker, its node or its memory
    ("died", re-run)."""
    try:
        from ray.exceptions import RayError, RayTaskError
    except ImportError:  # pragma: no cover
        return DIED, "died"
    if exc is not None and (isinstance(exc, RayTaskError) or not isinstance(exc, RayError)):
        cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
        msg = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        return f"setup failed on the Ray worker: {type(cause).__name__}: {msg}", "setup"
    detail = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    return (DIED + (f" ({detail[:300]})" if detail else "")), "died"


try:  # subclasses Ray's Searcher; keep the import of this module cheap where ray is missing
    from ray.tune.search import Searcher as _Searcher
except ImportError:  # pragma: no cover - ray is a dependency
    _Searcher = object  # type: ignore[assignment,misc]


@dataclass
class Live:
    trial_id: int
    number: int


_FINISHED = "FINISHED"  # Searcher.FINISHED


class Driver:
    """The driver's side: asks the Optuna study for each trial and tells it the outcome."""

    def __init__(
        self,
        study: optuna.Study,
        objective: Objective,
        *,
        target: int,
        finished_states: tuple[TrialState, ...],
        timeout: float | None,
        on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None,
        stopped: set[str],
        scheduler_name: str | None,
        trial_timeout: float | None = None,
    ) -> None:
        self.study = study
        self.storage = storage_of(study)
        self.objective = objective
        self.target = target
        self.finished_states = finished_states
        self.deadline = None if timeout is None else time.time() + timeout
        self.on_trial = on_trial
        self.stopped = stopped
        self.scheduler_name = scheduler_name or "the Tune scheduler"
        self.live: dict[str, Live] = {}
        self.errors: dict[str, BaseException | None] = {}  # Tune trial id → its Ray error
        self.failed_in_a_row = 0
        self.error: BaseException | None = None
        self.trial_timeout = trial_timeout
        self.unrecorded: list[Live] = []  # outcomes that could not be written: failed at close
        self._lock = threading.Lock()

    # -- what Tune's Searcher API calls -----------------------------------------------------
    def suggest(self, trial_id: str) -> dict | str | None:
        try:
            return self._suggest(trial_id)
        except Exception as exc:  # a storage error, or on_trial raised: stop starting trials
            if self.error is None:
                self.error = exc
            return _FINISHED if not self.live else None

    def _suggest(self, trial_id: str) -> dict | str | None:
        if self.error is not None or (self.deadline is not None and time.time() >= self.deadline):
            return _FINISHED if not self.live else None
        if self.failed_in_a_row >= MAX_FAILED_IN_A_ROW:
            self.error = SearchAborted(
                "every recent trial failed; stopping instead of burning time. Last reason: "
                + last_fail_reason(self.study)
            )
            return _FINISHED if not self.live else None
        fail_stale_trials(self.study)
        done = len(self.study.get_trials(deepcopy=False, states=self.finished_states))
        if done + len(self.live) >= self.target:
            return _FINISHED if not self.live else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize"
            trial = self.study.ask()
        record_heartbeat(self.storage, _tid(trial))
        # until a Ray worker takes it over, the trial belongs to this (driver) process
        trial.set_user_attr("worker", worker_record())
        try:
            self.objective.sample(trial)
        except Exception as exc:  # as Objective.__call__ + study.optimize(catch=...) locally
            reason = (
                f"invalid configuration: {exc}"
                if isinstance(exc, AutomlCxrError)
                else f"{type(exc).__name__}: {exc}"
            )
            trial.set_user_attr("fail_reason", reason)
            self._tell(trial.number, state=TrialState.FAIL)
            self._after(_tid(trial))
            return None  # Tune asks again at once
        with self._lock:
            self.live[trial_id] = Live(_tid(trial), trial.number)
        return {
            "optuna_trial_id": _tid(trial),
            "optuna_number": trial.number,
            "params": dict(trial.params),
        }

    def on_trial_complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        with self._lock:
            live = self.live.pop(trial_id, None)
        if live is None:
            return
        try:
            self._finish(trial_id, live, result or {}, error)
        except Exception as exc:  # never let a storage hiccup kill the Tune loop
            if self.error is None:
                self.error = exc
            self._fail_unrecorded(live, exc)

    def _fail_unrecorded(self, live: Live, exc: BaseException) -> None:
        """The outcome of `live` could not be recorded: mark it FAIL with the reason (straight
        through the storage), or, if even that fails, leave it for `close_unfinished`, so a
        trial is never left RUNNING by the driver."""
        reason = (
            "the Ray driver could not record this trial's outcome: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        )
        try:
            if not self.storage.get_trial(live.trial_id).state.is_finished():
                self._set_attr(live.trial_id, "fail_reason", reason)
                self.storage.set_trial_state_values(live.trial_id, TrialState.FAIL)
        except Exception:
            with self._lock:
                self.unrecorded.append(live)

    # -- outcome --------------------------------------------------------------------------
    def _finish(self, tune_id: str, live: Live, result: dict, error: bool) -> None:
        frozen = self.storage.get_trial(live.trial_id)
        if not frozen.state.is_finished():
            if result.get(FINAL):
                state = TrialState[str(result.get("optuna_state", "FAIL"))]
                values = result.get("optuna_values")
                if state == TrialState.COMPLETE:
                    self._tell(live.number, values=list(values))
                else:
                    if result.get("fail_reason") and not frozen.user_attrs.get("fail_reason"):
                        # the worker could not write to the study itself (a setup fault)
                        self._set_attr(live.trial_id, "fail_reason", result["fail_reason"])
                        self._set_attr(live.trial_id, "fail_kind", result.get("fail_kind"))
                    self._tell(live.number, state=state)
            elif error:
                reason, kind = describe_tune_error(self.errors.pop(tune_id, None))
                if not frozen.user_attrs.get("fail_reason") or kind == "died":
                    self._set_attr(live.trial_id, "fail_reason", reason)
                    self._set_attr(live.trial_id, "fail_kind", kind)
                self._tell(live.number, state=TrialState.FAIL)
            elif tune_id in self.stopped:
                step = result.get(STEP, frozen.last_step)
                self._set_attr(live.trial_id, "fail_reason", None)
                self._set_attr(live.trial_id, "pruned_by", self.scheduler_name)
                if step is not None:
                    self._set_attr(live.trial_id, "pruned_at_step", int(step))
                self._tell(live.number, state=TrialState.PRUNED)
            else:
                self._set_attr(
                    live.trial_id, "fail_reason", "Ray Tune stopped this trial before it finished"
                )
                self._tell(live.number, state=TrialState.FAIL)
            final = self.storage.get_trial(live.trial_id)
            if final.state == TrialState.FAIL and final.user_attrs.get("fail_kind") in RETRIED:
                enqueue_retry(self.study, final)  # asked for again at once, as locally
        self._after(live.trial_id)

    def _after(self, trial_id: int) -> None:
        final = self.storage.get_trial(trial_id)
        self.failed_in_a_row = self.failed_in_a_row + 1 if final.state == TrialState.FAIL else 0
        if self.on_trial is not None:
            self.on_trial(self.study, final)

    def _tell(
        self, number: int, *, values: list | None = None, state: TrialState | None = None
    ) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. NaN values: Optuna records FAIL, as locally
            self.study.tell(number, values, state=state, skip_if_finished=True)

    def _set_attr(self, trial_id: int, key: str, value: Any) -> None:
        with contextlib.suppress(UpdateFinishedTrialError):
            self.storage.set_trial_user_attr(trial_id, key, value)

    # -- around the Tune run --------------------------------------------------------------
    @contextlib.contextmanager
    def heartbeats(self) -> Iterator[None]:
        """Heartbeats for this driver's live trials, queued ones included (a queued trial has
        no worker yet, and another process's `fail_stale_trials` must not fail it)."""
        storage = self.storage
        if not heartbeat_enabled(storage):
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_INTERVAL / 2):
                with self._lock:
                    ids = [lv.trial_id for lv in self.live.values()]
                for tid in ids:
                    if not self._fail_if_hung(tid):
                        record_heartbeat(storage, tid)

        thread = threading.Thread(target=beat, name="automl-cxr-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _fail_if_hung(self, trial_id: int) -> bool:
        """With `trial_timeout`: a live trial still RUNNING `HUNG_GRACE` seconds past it (its
        worker checks the limit at every training step, so it is stuck, e.g. in a dead
        collective or I/O) is marked FAIL with that reason and no longer kept alive by this
        driver's heartbeat. Returns whether it was."""
        if self.trial_timeout is None:
            return False
        with contextlib.suppress(Exception):
            t = self.storage.get_trial(trial_id)
            if t.state.is_finished() or t.datetime_start is None:
                return t.state.is_finished()
            ran = time.time() - t.datetime_start.timestamp()
            if ran > self.trial_timeout + HUNG_GRACE:
                self._set_attr(
                    trial_id,
                    "fail_reason",
                    f"no outcome {ran:.0f} s after it started (--trial-timeout "
                    f"{self.trial_timeout:g} s, checked at every training step): the worker "
                    "is stuck; stopped waiting for it",
                )
                self._set_attr(trial_id, "fail_kind", "timeout")
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
                return True
        return False

    def close_unfinished(self) -> None:
        """Trials still RUNNING after Tune returned (interrupted, Tune error) → FAIL."""
        with self._lock:
            live, self.live = list(self.live.values()) + self.unrecorded, {}
            self.unrecorded = []
        for lv in live:
            with contextlib.suppress(Exception):
                t = self.storage.get_trial(lv.trial_id)
                if not t.state.is_finished():
                    self._set_attr(
                        lv.trial_id,
                        "fail_reason",
                        "interrupted: the search stopped while this trial ran",
                    )
                    self._tell(lv.number, state=TrialState.FAIL)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


DRIVERS: dict[str, Driver] = {}
"""Live drivers by key: Tune pickles (and may copy) its searcher; the study stays here."""


class AskTellSearcher(_Searcher):
    """Tune's view of a `_Driver`: a picklable handle (the driver holds a study, locks and
    callbacks, none of which pickle)."""

    def __init__(self, key: str) -> None:
        super().__init__(metric=METRIC, mode="max")
        self.key = key

    def suggest(self, trial_id: str) -> dict | str | None:
        driver = DRIVERS.get(self.key)
        return self.FINISHED if driver is None else driver.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        driver = DRIVERS.get(self.key)
        if driver is not None:
            driver.on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        pass  # nothing to save: the Optuna study is the record, and it resumes by itself

    def restore(self, checkpoint_path: str) -> None:
        pass
