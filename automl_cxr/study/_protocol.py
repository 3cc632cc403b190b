"""What makes two runs of a study the same experiment.

A study stores its *protocol* when it is created: the data (content hash), the seed, what a
fold holds out (`cv`), the profile's training protocol (resolution, epochs, folds, holdout,
early stopping, subsampling), a hash of every fold's members, the search space's content hash,
sampler and pruner, the device and precision trials compute in, and the versions of the
packages that compute them. A later run under the same study name (a resume, a parallel
worker, a Ray driver) must match it field by field, or it would silently mix protocols in one
leaderboard; the error names every differing field. Studies written before a field existed
are not compared on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from automl_cxr.data import PreparedDataset
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.study._profiles import Profile

__all__ = [
    "PROTOCOL_FIELDS",
    "check_metrics",
    "check_protocol",
    "fold_members",
    "package_versions",
    "space_hash",
    "study_protocol",
]

PROTOCOL_FIELDS = (
    "dataset_hash",
    "seed",
    "cv",
    "profile",
    "resolution",
    "epochs",
    "n_folds",
    "holdout",
    "max_folds",
    "early_stopping",
    "max_per_class",
    "pretrained",
    "space_hash",
    "sampler",
    "pruner",
    "device",
    "precision",
    "versions",
    "test",
    "folds",
)
"""Fields compared on resume, in the order differences are reported."""

_HOW_TO_MATCH = {
    "seed": "--seed",
    "cv": "--cv",
    "profile": "--profile",
    "sampler": "--sampler",
    "pruner": "--pruner",
}

VERSIONED = ("automl_cxr", "torch", "timm")
"""Packages whose version changes what a trial measures (weights, kernels, layers)."""


def package_versions() -> dict[str, str]:
    """The versions of `VERSIONED` in this process."""
    import timm
    import torch

    from automl_cxr import __version__

    return {"automl_cxr": __version__, "torch": torch.__version__, "timm": timm.__version__}


def space_hash(space: Any) -> str:
    """Content hash of a search space (its `to_dict()`, keys sorted)."""
    data = space.to_dict() if hasattr(space, "to_dict") else space
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def study_protocol(
    dataset: PreparedDataset,
    profile: Profile,
    *,
    seed: int,
    cv: str,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The protocol of a run: plain JSON data, with the folds' members as hashes. `run` adds
    what the search settings decide (`space_hash`, `sampler`, `pruner`, `device`,
    `precision`); package versions are this process's.

    Computing the folds here (once; the engine caches them for the trials) also checks that
    the dataset supports `cv` (site-held-out folds need a `site` column and at least two
    sites per class) before any study row is written.
    """
    from automl_cxr.engine import dataset_splits, members_hash, row_identities

    splits, warnings = dataset_splits(dataset, cv, profile.n_folds, profile.holdout, seed)
    used = splits if profile.max_folds is None else splits[: profile.max_folds]
    ids = row_identities(dataset)
    return {
        "dataset": dataset.name,
        "dataset_hash": dataset.hash,
        "seed": int(seed),
        "cv": cv,
        "profile": profile.name,
        "resolution": profile.resolution,
        "epochs": profile.epochs,
        "n_folds": profile.n_folds,
        "holdout": profile.holdout,
        "max_folds": profile.max_folds,
        "early_stopping": profile.early_stopping,
        "max_per_class": profile.max_per_class,
        "pretrained": profile.pretrained,
        **dict(run or {}),
        "versions": package_versions(),
        "folds": [
            {
                "fold": int(s.fold),
                "n_train": int(s.train.size),
                "n_val": int(s.val.size),
                "train_hash": members_hash(ids, s.train),
                "val_hash": members_hash(ids, s.val),
            }
            for s in used
        ],
        "fold_warnings": list(warnings),
    }


def legacy_protocol(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a study created before protocols were stored says about its protocol: its seed,
    profile and data; `cv` was always by patient then."""
    prof = attrs.get("profile") or {}
    out: dict[str, Any] = {"dataset_hash": attrs.get("dataset_hash"), "cv": "patient"}
    if "seed" in attrs:
        out["seed"] = attrs["seed"]
    if isinstance(prof, Mapping):
        out["profile"] = prof.get("name")
        for key in ("resolution", "epochs", "n_folds", "holdout", "max_folds"):
            if key in prof:
                out[key] = prof[key]
        for key in ("early_stopping", "max_per_class", "pretrained"):
            if key in prof:
                out[key] = prof[key]
    return out


def protocol_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per field the two protocols disagree on (fields the stored one lacks are not
    compared)."""
    lines = []
    for key in PROTOCOL_FIELDS:
        if key not in stored or key not in current:
            continue
        a, b = stored[key], current[key]
        if key == "folds":
            # The folds follow from the data, seed, cv and fold count: report them only when
            # those agree (then the data's rows or the splitter itself changed).
            if not lines and fold_members(a) != fold_members(b):
                lines.append(
                    "folds: this run's fold members differ from the study's (same seed and "
                    "cv, so the data or the splitter changed)"
                )
        elif a != b:
            if key == "test":
                was, now = _test_spec(a), _test_spec(b)
                lines.append(
                    f"test: the study's test split is {was!r}, this run's {now!r} (pass "
                    + (f"--test {was})" if was else "no --test)")
                )
                continue
            if key == "space_hash":
                lines.append(
                    f"space: the study searched a space with content hash {str(a)[:12]}, this "
                    f"run's has {str(b)[:12]} (pass the study's --space)"
                )
                continue
            if key == "versions":
                diff = ", ".join(
                    f"{k} {a.get(k)} → {b.get(k)}"
                    for k in sorted({*a, *b})
                    if isinstance(a, Mapping) and isinstance(b, Mapping) and a.get(k) != b.get(k)
                )
                lines.append(
                    f"versions: the study's trials were measured with other packages ({diff}); "
                    "install the study's versions to resume it"
                )
                continue
            if key == "dataset_hash":
                a, b = str(a)[:12], str(b)[:12]
                lines.append(
                    f"data: the study's dataset has content hash {a}, this run's {b} (another "
                    "--seed subsamples other patients; otherwise prepare the same data)"
                )
                continue
            flag = _HOW_TO_MATCH.get(key)
            hint = f" (pass {flag} {a})" if flag and a is not None else ""
            lines.append(f"{key}: the study has {a!r}, this run {b!r}{hint}")
    return lines


def _test_spec(test: Any) -> str | None:
    return test.get("spec") if isinstance(test, Mapping) else None


def check_protocol(stored: Mapping[str, Any], current: Mapping[str, Any], name: str) -> None:
    """Raise StorageError naming each field where this run's protocol differs from the
    study's."""
    lines = protocol_differences(stored, current)
    if lines:
        listing = "\n  ".join(lines)
        raise StorageError(
            f"study {name!r} was run under another protocol; resuming would mix two "
            f"experiments in one leaderboard:\n  {listing}\nRun with the study's settings to "
            "resume it, or start a new study instead: --study-name NEW_NAME (or another "
            "--storage)."
        )


def check_metrics(
    metrics: Sequence[str], classes: Sequence[str], positive: str | None, *, dataset: str
) -> None:
    """Every objective metric must be one this dataset gets (e.g. `sensitivity_<class>` for
    one of its classes), checked before any image is decoded or any study row is written."""
    from automl_cxr.engine import available_metrics
    from automl_cxr.study._record import OBJECTIVE_KEYS

    allowed = available_metrics(classes, positive)
    bad = [m for m in metrics if m not in allowed and m not in OBJECTIVE_KEYS]
    if bad:
        raise ConfigError(
            f"metric(s) {bad} are not computed for dataset {dataset!r} (classes {list(classes)}, "
            f"positive {positive!r}); allowed: {allowed} and, as costs, {sorted(OBJECTIVE_KEYS)}"
        )


def fold_members(folds: Any) -> Any:
    """What identifies a run's or a trial's folds: per fold (fold, train_hash, val_hash) where
    the records carry the members' hashes, else the records as they are (older studies)."""
    if not isinstance(folds, list):
        return folds
    if all(isinstance(f, Mapping) and "val_hash" in f for f in folds):
        return [(f.get("fold"), f.get("train_hash"), f.get("val_hash")) for f in folds]
    return folds
