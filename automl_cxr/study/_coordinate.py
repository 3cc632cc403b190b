"""A local search whose trials all run in worker processes, coordinated by a process that never
imports torch: the setup stages (space, data, protocol, external sets, study) run in a
short-lived child, the trials in the workers, and this process only watches the storage and
reports. torch and timm are ~0.45-0.65 GB resident per process; a coordinator that held them
for the whole search took that from the workers (issue 26: ≤ 4 GB for a two-worker search
over 50,000 images)."""

from __future__ import annotations

import dataclasses
import pickle
import queue
import subprocess
import sys
import traceback
from collections.abc import Callable

import optuna

from automl_cxr.errors import AutomlCxrError, StorageError
from automl_cxr.study._profiles import default_profile, get_profile, profile_workers
from automl_cxr.study._settings import SearchSettings

__all__ = ["coordinates_only", "probe_device", "run_setup_child"]

Prepare = Callable[[SearchSettings, Callable[[str], None]], tuple]

_PROBE = "from automl_cxr.engine import resolve_device; print(resolve_device('auto').type)"


def probe_device() -> str:
    """The device type a trial on this machine resolves (`resolve_device("auto")`), found in
    a short-lived child process so this one stays torch-free."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600, check=False
    )
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise AutomlCxrError(
            f"could not resolve the device in a child process (exit {out.returncode}): "
            f"{out.stderr.strip()[-500:]}"
        )
    return lines[-1]


def coordinates_only(settings: SearchSettings) -> SearchSettings | None:
    """`settings` with the profile decided, when this process would only coordinate local
    worker processes (more than one) and has not imported torch yet; else None."""
    if settings.backend != "local" or "torch" in sys.modules:
        return None
    if settings.workers is not None:
        return settings if settings.workers > 1 else None
    if settings.profile is None:
        profile = default_profile(cuda=probe_device() == "cuda")
        settings = dataclasses.replace(settings, profile=profile.name)
    return settings if profile_workers(get_profile(settings.profile)) > 1 else None


def run_setup_child(
    settings: SearchSettings, prepare: Prepare, log: Callable[[str], None] | None
) -> tuple:
    """`prepare(settings, log)` (the search's setup stages, ending with the study created or
    resumed) run in a spawned child; its log lines reach `log` as they come, its refusal
    (an `AutomlCxrError`) is raised here as itself, and what it returns comes back."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    proc = ctx.Process(
        target=_setup_main,
        args=(prepare, settings, messages, optuna.logging.get_verbosity()),
        daemon=True,
    )
    proc.start()
    try:
        while True:
            try:
                kind, value = messages.get(timeout=0.5)
            except queue.Empty:
                if proc.is_alive():
                    continue
                try:  # it may have put its last message just before it ended
                    kind, value = messages.get(timeout=2)
                except queue.Empty:
                    raise StorageError(
                        f"the search's setup process ended with exit code {proc.exitcode} "
                        "before the study was ready"
                    ) from None
            if kind == "log":
                if log:
                    log(value)
            elif kind == "error":
                raise value
            else:
                return value
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()


def _setup_main(prepare: Prepare, settings: SearchSettings, messages, verbosity: int) -> None:
    optuna.logging.set_verbosity(verbosity)
    try:
        result = prepare(settings, lambda line: messages.put(("log", line)))
    except AutomlCxrError as exc:
        messages.put(("error", _sendable(exc)))
    except KeyboardInterrupt:
        messages.put(("error", KeyboardInterrupt()))
    except Exception:  # a bug: its traceback goes with it
        messages.put(("error", RuntimeError(f"in the setup process:\n{traceback.format_exc()}")))
    else:
        messages.put(("done", result))
    messages.close()
    messages.join_thread()


def _sendable(exc: AutomlCxrError) -> AutomlCxrError:
    """`exc` if it survives pickling, else the nearest of its classes built from its message
    alone (one whose `__init__` takes other arguments cannot be rebuilt by pickle)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to round-trip
        pass
    for cls in type(exc).__mro__:
        if issubclass(cls, AutomlCxrError):
            try:
                plain = cls(str(exc))
                pickle.loads(pickle.dumps(plain))
                return plain
            except Exception:  # noqa: BLE001, S112 - try the next base class
                continue
    return AutomlCxrError(str(exc))
