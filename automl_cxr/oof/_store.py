"""Out-of-fold predictions of COMPLETE trials, stored once per trial in Optuna's artifact store.

Every COMPLETE trial gets one compressed ``.npz`` artifact (:func:`save_oof`) holding its pooled
out-of-fold predictions, row-aligned to the dataset it ran on:

``log_probs``  (N, C) float16 — natural log of the class probabilities (``-inf``-free: clipped
               at log(1e-7)); rows never validated (``max_folds`` < K) are NaN;
``labels``     (N,) int16 — true class index;
``folds``      (N,) int8 — the validation fold of each row (-1: never validated);
``groups``     (N,) int32 — split-group (patient) code, for patient-level bootstraps;
``classes``, ``dataset_hash`` — the class order and the manifest hash the rows follow;
``test_log_probs``, ``test_labels``, ``test_groups``, ``test_hash`` — with ``search --test``,
               the fold models' averaged predictions on the test split (its manifest order),
               read back as :class:`TestPredictions`; the study records no metric of them.

Row order is the dataset manifest's (after the profile's subsampling), identified by the
manifest hash the trial records (``dataset_hash``). Log-probabilities in float16 keep ~3
significant digits of every probability, small ones included. Size: about 2 · N · C bytes
for the predictions (incompressible) plus a few bytes per row for labels, folds and groups
after compression — 13 KB per trial for a 1,442 x 4 array (the paper-size four-class set;
measured with simulated probabilities), so a 200-trial study adds about 2.6 MB (2 KB per
trial for the 122-image smoke set).

The artifact folder sits beside the study: ``studies/x.db`` → ``studies/x.artifacts/`` (also
for journal files); a server storage (PostgreSQL, MySQL) needs ``$AUTOML_CXR_ARTIFACTS`` (a
folder every worker can write), else nothing is stored and the trial's ``oof`` attribute says
why. ``$AUTOML_CXR_ARTIFACTS`` overrides the folder for every storage.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from automl_cxr._compat.optuna import storage_of
from automl_cxr._storage import storage_location, storage_url
from automl_cxr.errors import DataError, StorageError

__all__ = [
    "ARTIFACTS_ENV",
    "OOF_ATTR",
    "OOF_FORMAT",
    "OofPredictions",
    "TestPredictions",
    "artifact_dir",
    "artifact_store",
    "load_oof",
    "load_study_oof",
    "oof_arrays",
    "save_oof",
]

OOF_FORMAT = 1
OOF_ATTR = "oof"
ARTIFACTS_ENV = "AUTOML_CXR_ARTIFACTS"
_LOG_FLOOR = float(np.log(1e-7))


def artifact_dir(storage: str | Path | optuna.storages.BaseStorage) -> Path | None:
    """The artifact folder of a study storage (path, URL or storage object), or None when it
    has no place on disk (a server database without ``$AUTOML_CXR_ARTIFACTS``, in-memory)."""
    env = os.environ.get(ARTIFACTS_ENV)
    if env:
        return Path(env)
    if isinstance(storage, (str, Path)):
        url: str | None = storage_url(storage)
    else:
        url = storage_location(storage)
    if not url:
        return None
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///").split("?")[0]
        if not path or path == ":memory:":
            return None
    elif url.startswith("journal:"):
        path = url.removeprefix("journal:")
    else:
        return None
    p = Path(path)
    return p.with_name(p.stem + ".artifacts")


def artifact_store(
    storage: str | Path | optuna.storages.BaseStorage, *, create: bool = False
) -> optuna.artifacts.FileSystemArtifactStore | None:
    """Optuna's file-system artifact store beside the study (None where there is none)."""
    d = artifact_dir(storage)
    if d is None:
        return None
    if create:
        d.mkdir(parents=True, exist_ok=True)
    elif not d.is_dir():
        return None
    return optuna.artifacts.FileSystemArtifactStore(str(d))


@dataclass
class TestPredictions:
    """A trial's fold models' averaged probabilities on the search's test split."""

    probs: np.ndarray  # (M, C) float64
    labels: np.ndarray  # (M,) int
    groups: np.ndarray  # (M,) int split-group codes
    dataset_hash: str  # the test split's hash


@dataclass
class OofPredictions:
    """One trial's pooled out-of-fold predictions (rows in the dataset manifest's order)."""

    number: int
    classes: list[str]
    probs: np.ndarray  # (N, C) float64; NaN rows were never validated
    labels: np.ndarray  # (N,) int
    folds: np.ndarray  # (N,) int, -1 where never validated
    groups: np.ndarray  # (N,) int split-group codes
    dataset_hash: str
    test: TestPredictions | None = None
    folds_from_splits: bool = False  # stored fold ids disagreed with the trial's splits

    @property
    def validated(self) -> np.ndarray:
        return ~np.isnan(self.probs).any(axis=1)

    def valid(self) -> OofPredictions:
        """The validated rows only."""
        m = self.validated
        return OofPredictions(
            self.number,
            self.classes,
            self.probs[m],
            self.labels[m],
            self.folds[m],
            self.groups[m],
            self.dataset_hash,
            self.test,
            self.folds_from_splits,
        )

    def class_index(self, name: str | None) -> int:
        """Index of class `name` (the dataset's positive); DataError names the classes."""
        if name is None or name not in self.classes:
            raise DataError(f"class {name!r} is not one of this study's classes {self.classes}")
        return self.classes.index(name)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(np.clip(probs, 1e-7, 1.0))
    logp[np.isnan(probs).any(axis=1)] = np.nan
    return np.maximum(logp, _LOG_FLOOR).astype(np.float16)


def _group_codes(dataset: Any) -> np.ndarray:
    return np.unique(np.asarray(dataset.groups).astype(str), return_inverse=True)[1].astype(
        np.int32
    )


def _probs(log_probs: np.ndarray) -> np.ndarray:
    probs = np.exp(log_probs.astype(np.float64))
    with np.errstate(invalid="ignore"):
        return probs / probs.sum(axis=1, keepdims=True)


def oof_arrays(result: Any, dataset: Any, test: Any = None) -> dict[str, np.ndarray]:
    """The arrays of the artifact for one trial result on `dataset` (and its `test` split's
    predictions, when the search has one; see the module doc)."""
    probs = np.asarray(result.oof_probs, dtype=np.float64)
    if probs.shape != (len(dataset), len(dataset.classes)):
        raise DataError(
            f"out-of-fold predictions of shape {probs.shape} do not match dataset "
            f"{dataset.name!r} ({len(dataset)} rows, {len(dataset.classes)} classes)"
        )
    seen = ~np.isnan(probs).any(axis=1)
    folds = getattr(result, "oof_folds", None)
    if folds is None or np.shape(folds) != (len(dataset),):
        raise DataError(
            f"the trial result carries no fold of each out-of-fold row (oof_folds of shape "
            f"{np.shape(folds)}, expected ({len(dataset)},)): it must come from run_trial"
        )
    folds = np.asarray(folds, dtype=np.int8)
    if not np.array_equal(folds >= 0, seen):
        raise DataError(
            f"out-of-fold folds and predictions disagree: {int((folds >= 0).sum())} rows have "
            f"a fold, {int(seen.sum())} have predictions"
        )
    out = {
        "log_probs": _log_probs(probs),
        "labels": np.asarray(dataset.labels, dtype=np.int16),
        "folds": folds.astype(np.int8),
        "groups": _group_codes(dataset),
        "classes": np.asarray(list(dataset.classes)),
        "dataset_hash": np.asarray(str(dataset.hash)),
        "format": np.asarray(OOF_FORMAT, dtype=np.int16),
    }
    test_probs = getattr(result, "test_probs", None)
    if test is not None and test_probs is not None:
        tp = np.asarray(test_probs, dtype=np.float64)
        if tp.shape != (len(test), len(dataset.classes)):
            raise DataError(
                f"test predictions of shape {tp.shape} do not match the test split "
                f"({len(test)} rows, {len(dataset.classes)} classes)"
            )
        to_study = np.array([dataset.classes.index(c) for c in test.classes], dtype=np.int64)
        out |= {
            "test_log_probs": _log_probs(tp),
            "test_labels": to_study[np.asarray(test.labels)].astype(np.int16),
            "test_groups": _group_codes(test),
            "test_hash": np.asarray(str(test.hash)),
        }
    return out


def save_oof(
    trial: optuna.Trial, result: Any, dataset: Any, test: Any = None
) -> dict[str, Any] | None:
    """Store a finished trial's out-of-fold predictions as an artifact of the trial and record
    where in its ``oof`` user attribute (``{stored, artifact_id, bytes, rows, validated, …}``).
    Returns that record (None when the result carries no predictions)."""
    if getattr(result, "oof_probs", None) is None:
        return None
    storage = storage_of(trial.study)
    try:
        store = artifact_store(storage, create=True)
    except OSError as exc:  # a full or read-only disk must not fail a trained trial
        info = {"stored": False, "reason": f"cannot create the artifact folder: {exc}"}
        trial.set_user_attr(OOF_ATTR, info)
        return info
    if store is None:
        info: dict[str, Any] = {
            "stored": False,
            "reason": f"this storage has no folder for artifacts: set ${ARTIFACTS_ENV}",
        }
        trial.set_user_attr(OOF_ATTR, info)
        return info
    arrays = oof_arrays(result, dataset, test)
    try:
        with tempfile.TemporaryDirectory(prefix="automl-cxr-oof-") as tmp:
            path = Path(tmp) / f"oof_trial{trial.number}.npz"
            np.savez_compressed(path, **arrays)
            size = path.stat().st_size
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=store,
                file_path=str(path),
                study_or_trial=trial,
                mimetype="application/octet-stream",
            )
    except OSError as exc:  # a full or read-only disk must not fail a trained trial
        info = {"stored": False, "reason": f"cannot write the artifact: {exc}"}
        trial.set_user_attr(OOF_ATTR, info)
        return info
    info = {
        "stored": True,
        "format": OOF_FORMAT,
        "artifact_id": artifact_id,
        "file": f"oof_trial{trial.number}.npz",
        "bytes": int(size),
        "rows": int(len(arrays["labels"])),
        "validated": int((arrays["folds"] >= 0).sum()),
        "dataset_hash": str(dataset.hash),
        "classes": list(dataset.classes),
        "test_rows": int(len(arrays["test_labels"])) if "test_labels" in arrays else 0,
    }
    trial.set_user_attr(OOF_ATTR, info)
    return info


def _read(store: Any, artifact_id: str) -> dict[str, np.ndarray]:
    with store.open_reader(artifact_id) as f:
        data = f.read()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _recorded_folds(trial: FrozenTrial, validated: np.ndarray) -> np.ndarray | None:
    """Each row's validation fold as the trial recorded its splits (`metrics.splits[i]
    .val_indices`), or None when it recorded none or they do not cover exactly the validated
    rows."""
    splits = (trial.user_attrs.get("metrics") or {}).get("splits") or []
    if not splits or any("val_indices" not in sp for sp in splits):
        return None
    folds = np.full(len(validated), -1, dtype=np.int64)
    for sp in splits:
        idx = np.asarray(sp["val_indices"], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(folds)):
            return None
        folds[idx] = int(sp["fold"])
    return folds if np.array_equal(folds >= 0, validated) else None


def load_oof(
    trial: FrozenTrial,
    storage: str | Path | optuna.storages.BaseStorage,
    *,
    required: bool = False,
) -> OofPredictions | None:
    """A trial's stored out-of-fold predictions (None if it has none, unless `required`:
    then a StorageError says why).

    The fold of each row is the one the trial's recorded splits name: artifacts written before
    2026-12-05 under `--cv site` carried a patient splitter's fold ids beside the site folds'
    predictions; such a trial's folds are taken from its splits (`folds_from_splits`)."""
    info = trial.user_attrs.get(OOF_ATTR) or {}

    def missing(why: str) -> None:
        if required:
            raise StorageError(
                f"trial {trial.number} has no stored out-of-fold predictions ({why}); they are "
                "written by `automl-cxr search` for every COMPLETE trial: run the trial again "
                "(e.g. `search --enqueue` with its parameters)"
            )

    if not info.get("stored"):
        missing(info.get("reason") or "the study predates them")
        return None
    store = artifact_store(storage)
    if store is None:
        missing(f"no artifact folder {artifact_dir(storage)}")
        return None
    try:
        z = _read(store, str(info["artifact_id"]))
    except Exception as exc:  # a missing or damaged file: any reader error
        where = f"artifact {info.get('artifact_id')} in {artifact_dir(storage)}"
        gone = isinstance(exc, FileNotFoundError) or type(exc).__name__ == "ArtifactNotFound"
        if gone:
            missing(f"{where} is missing")
            return None
        # present but damaged: never quietly treated as absent
        raise DataError(
            f"trial {trial.number}: its stored out-of-fold predictions ({where}) are damaged "
            f"({type(exc).__name__}: {exc}); delete the file to drop them, or run the trial "
            "again"
        ) from None
    test = None
    if "test_log_probs" in z:
        test = TestPredictions(
            probs=_probs(z["test_log_probs"]),
            labels=z["test_labels"].astype(np.int64),
            groups=z["test_groups"].astype(np.int64),
            dataset_hash=str(z["test_hash"]),
        )
    probs = _probs(z["log_probs"])
    folds = z["folds"].astype(np.int64)
    recorded = _recorded_folds(trial, ~np.isnan(probs).any(axis=1))
    repaired = recorded is not None and not np.array_equal(recorded, folds)
    return OofPredictions(
        number=trial.number,
        classes=[str(c) for c in z["classes"]],
        probs=probs,
        labels=z["labels"].astype(np.int64),
        folds=recorded if repaired else folds,
        groups=z["groups"].astype(np.int64),
        dataset_hash=str(z["dataset_hash"]),
        test=test,
        folds_from_splits=repaired,
    )


def load_study_oof(
    study: optuna.Study,
    storage: str | Path | optuna.storages.BaseStorage,
    *,
    problems: list[str] | None = None,
) -> dict[int, OofPredictions]:
    """Stored out-of-fold predictions of every COMPLETE trial, keyed by trial number; only
    trials on the same rows (dataset hash and folds) as the first one found are kept. A
    damaged artifact is left out and its error appended to `problems` (raised without it)."""
    out: dict[int, OofPredictions] = {}
    ref: OofPredictions | None = None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        try:
            o = load_oof(t, storage)
        except DataError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        if o is None:
            continue
        if ref is None:
            ref = o
        same = (
            o.dataset_hash == ref.dataset_hash
            and o.classes == ref.classes
            and np.array_equal(o.folds, ref.folds)
        )
        if same:
            out[t.number] = o
    return out
