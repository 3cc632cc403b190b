"""Patient-grouped, stratified train/validation splits.

Every split keeps all images of a patient on one side: images of the same patient are strongly
correlated (several radiographs of one COVID-19 case in the Cohen set, several files of one child in
Kermany), so splitting by image would leak and inflate the validation scores.

* ``make_splits(labels, groups, n_folds=k)`` gives ``k`` folds from scikit-learn's
  ``StratifiedGroupKFold`` (shuffled with ``seed``); every image is in exactly one validation fold.
* ``make_splits(labels, groups, holdout=f)`` gives one train/validation split with about a fraction
  ``f`` of the images of each class in validation, again grouped by patient.

``make_splits`` always checks its result with :func:`assert_no_patient_leakage`, so a split that
puts one patient on both sides is never returned.

* ``make_site_splits(labels, patients, sites, n_folds=k)`` holds out acquisition sites: sites that
  share a patient are merged into one group (union-find), folds are ``StratifiedGroupKFold`` over
  those groups, so no site and no patient is on both sides. When a class is seen at too few site
  groups for ``k`` folds, it falls back to the largest feasible ``k`` and says so in its warnings;
  when no ``k >= 2`` is feasible it raises :class:`ConfigError`.
* :func:`members_hash` is a sha256 over the identities of a set of rows, so another process can
  check that two trials trained and validated on the same members.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from automl_cxr.data import site_groups
from automl_cxr.errors import ConfigError, DataError

__all__ = [
    "Split",
    "assert_no_patient_leakage",
    "assert_no_site_leakage",
    "make_site_splits",
    "make_splits",
    "members_hash",
    "split_summary",
]

_MAX_LISTED = 10


@dataclass(frozen=True, eq=False)
class Split:
    """One fold: integer positions (into the labels/groups given) of training and validation images.

    The index arrays are read-only and sorted. Two splits are equal when their fold number and
    index arrays are.
    """

    fold: int
    train: np.ndarray
    val: np.ndarray

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            arr = np.sort(np.asarray(getattr(self, name), dtype=np.intp).ravel())
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        return (
            self.fold == other.fold
            and np.array_equal(self.train, other.train)
            and np.array_equal(self.val, other.val)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Split(fold={self.fold}, n_train={self.train.size}, n_val={self.val.size})"


def make_splits(
    labels: Sequence[str] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    n_folds: int = 5,
    holdout: float | None = None,
    seed: int = 0,
) -> list[Split]:
    """Stratified, patient-grouped splits of ``len(labels)`` images.

    Args:
        labels: class label of each image.
        groups: patient id of each image; all images of one patient land on the same side. Ids
            from different sources should be made distinct by the caller (e.g. ``"cohen:12"``).
        n_folds: number of cross-validation folds (at least 2, and at most the number of patients
            of the least represented class). Ignored when ``holdout`` is given.
        holdout: if given, return a single split with about this fraction of each class's images
            in validation (in ``(0, 0.5]``) instead of ``n_folds`` folds.
        seed: shuffling seed; the same inputs and seed give the same splits.

    Returns:
        ``n_folds`` splits (folds ``0..n_folds-1``), or one split (fold 0) with ``holdout``.

    Raises:
        ConfigError: bad ``n_folds``/``holdout``, mismatched lengths, empty inputs, or too few
            patients in a class for the requested number of folds.
    """
    y, g = _validate_inputs(labels, groups)
    patients_per_class = {cls: int(np.unique(g[y == cls]).size) for cls in np.unique(y)}
    smallest, smallest_cls = min((n, str(c)) for c, n in patients_per_class.items())
    if holdout is not None:
        _check_holdout(holdout)
        if smallest < 2:
            raise ConfigError(
                f"a holdout split needs at least 2 patients per class, but class "
                f"{smallest_cls!r} has {smallest} patient{'s' if smallest != 1 else ''}"
            )
        splits = [_holdout_split(y, g, float(holdout), seed)]
    else:
        _check_n_folds(n_folds)
        if n_folds > smallest:
            raise ConfigError(
                f"n_folds={n_folds} is larger than the number of patients ({smallest}) of the "
                f"smallest class {smallest_cls!r}; use n_folds <= {smallest}"
            )
        cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = [
            Split(fold=i, train=tr, val=va)
            for i, (tr, va) in enumerate(cv.split(np.zeros(y.size), y, g))
        ]
    for s in splits:
        if s.train.size == 0 or s.val.size == 0:  # pragma: no cover - guarded by the checks above
            raise DataError(f"fold {s.fold} has an empty train or validation set")
    assert_no_patient_leakage(splits, g)
    return splits


def make_site_splits(
    labels: Sequence[str] | np.ndarray,
    patients: Sequence[str] | np.ndarray,
    sites: Sequence[str] | np.ndarray,
    *,
    n_folds: int = 5,
    holdout: float | None = None,
    seed: int = 0,
) -> tuple[list[Split], list[str]]:
    """Stratified splits that hold out whole acquisition sites (patients never straddle either).

    Sites sharing a patient are merged (:func:`site_groups`); the merged groups are split like
    patients in :func:`make_splits`. A class seen at only ``m`` groups allows at most ``m``
    folds (every fold must train on every class): a larger ``n_folds`` falls back to the
    largest feasible number, down to 2, with a warning; a fold without some class in training
    lowers it further, also with a warning.

    Returns:
        ``(splits, warnings)``: the splits as :func:`make_splits` gives them, and the reasons
        for any fallback (empty when ``n_folds`` folds were made as asked).

    Raises:
        ConfigError: a class is seen at a single site group (no site-held-out validation is
            possible), or the inputs are bad (as in :func:`make_splits`).
    """
    y, p = _validate_inputs(labels, patients)
    _, s = _validate_inputs(labels, sites)
    g = site_groups(p, s).astype(str)
    groups_per_class = {cls: np.unique(g[y == cls]) for cls in np.unique(y)}
    few_cls, few = min(groups_per_class.items(), key=lambda kv: (kv[1].size, str(kv[0])))
    if few.size < 2:
        raise ConfigError(
            f"site-held-out validation is not possible: class {str(few_cls)!r} is seen only at "
            f"{_listing(few.tolist())} (sites sharing a patient are merged); every class needs "
            "images from at least 2 sites. Use cv='patient' or add data from other sites"
        )
    warnings: list[str] = []
    if holdout is not None:
        _check_holdout(holdout)
        splits = [_holdout_split(y, g, float(holdout), seed)]
        _require_all_classes(splits, y, "a site holdout")
    else:
        _check_n_folds(n_folds)
        k = n_folds
        if k > few.size:
            k = int(few.size)
            warnings.append(
                f"n_folds={n_folds} site-held-out folds are not feasible: class "
                f"{str(few_cls)!r} is seen at only {few.size} site groups "
                f"{_listing(few.tolist())}; using n_folds={k}"
            )
        while True:
            cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            splits = [
                Split(fold=i, train=tr, val=va)
                for i, (tr, va) in enumerate(cv.split(np.zeros(y.size), y, g))
            ]
            missing = _classes_missing_from_training(splits, y)
            if not missing:
                break
            if k == 2:
                fold, cls = missing[0]
                raise ConfigError(
                    f"site-held-out validation is not possible: even with 2 folds, fold {fold} "
                    f"would train without any image of class {str(cls)!r} (its sites are "
                    f"{_listing(groups_per_class[cls].tolist())}). Use cv='patient'"
                )
            fold, cls = missing[0]
            warnings.append(
                f"with n_folds={k}, fold {fold} would train without class {str(cls)!r}; "
                f"using n_folds={k - 1}"
            )
            k -= 1
    assert_no_patient_leakage(splits, p)
    assert_no_site_leakage(splits, g)
    return splits, warnings


def _classes_missing_from_training(splits: Sequence[Split], y: np.ndarray) -> list[tuple]:
    classes = set(np.unique(y).tolist())
    out = []
    for sp in splits:
        for cls in sorted(classes - set(np.unique(y[sp.train]).tolist()), key=str):
            out.append((sp.fold, cls))
    return out


def _require_all_classes(splits: Sequence[Split], y: np.ndarray, what: str) -> None:
    missing = _classes_missing_from_training(splits, y)
    if missing:
        raise ConfigError(
            f"{what} would train without any image of class {str(missing[0][1])!r}; "
            "use cv='patient' or another seed"
        )


def assert_no_site_leakage(splits: Sequence[Split], sites: Sequence[str] | np.ndarray) -> None:
    """Raise :class:`DataError` if a site (or merged site group) is on both sides of a split."""
    s = np.asarray(sites).astype(str)
    for sp in splits:
        both = np.intersect1d(s[sp.train], s[sp.val])
        if both.size:
            raise DataError(
                f"site leakage in fold {sp.fold}: {both.size} sites have images in both train "
                f"and val: {_listing(both.tolist())}"
            )


def members_hash(identities: Sequence[str] | np.ndarray, indices: np.ndarray | None = None) -> str:
    """sha256 over the sorted identities of some rows (all rows, or those at ``indices``).

    Identities are per-row strings that do not depend on the process (e.g. each image's sha256);
    the hash does not depend on the order of the rows.
    """
    ids = np.asarray(identities).astype(str)
    if indices is not None:
        ids = ids[np.asarray(indices, dtype=np.intp)]
    return hashlib.sha256("\n".join(sorted(ids.tolist())).encode()).hexdigest()


def assert_no_patient_leakage(splits: Sequence[Split], groups: Sequence[str] | np.ndarray) -> None:
    """Raise :class:`DataError` if any patient has images on both sides of a split.

    Also fails when an image is in both train and validation of one fold, or an index is out of
    range for ``groups``.
    """
    g = np.asarray(groups)
    for s in splits:
        for name, idx in (("train", s.train), ("val", s.val)):
            if idx.size and (idx.min() < 0 or idx.max() >= g.size):
                raise DataError(
                    f"fold {s.fold}: {name} indices must be in [0, {g.size}), but got "
                    f"min={int(idx.min())}, max={int(idx.max())}"
                )
        shared = np.intersect1d(s.train, s.val)
        if shared.size:
            raise DataError(
                f"fold {s.fold}: {shared.size} images are in both train and val "
                f"(indices {_listing(shared.tolist())})"
            )
        leaked = np.intersect1d(g[s.train], g[s.val])
        if leaked.size:
            raise DataError(
                f"patient leakage in fold {s.fold}: {leaked.size} patient ids have images in both "
                f"train and val: {_listing(leaked.tolist())}"
            )


def split_summary(
    splits: Sequence[Split], labels: Sequence[str] | np.ndarray
) -> list[dict[str, Any]]:
    """Sizes and class counts of each split, for logging (plain Python types only).

    Returns one dict per split: ``{"fold", "n_train", "n_val", "val_fraction", "train_counts",
    "val_counts"}``; the counts map each label (as ``str``) to its number of images, every label
    listed, zeros included.
    """
    y = np.asarray(labels)
    classes = sorted({str(c) for c in y.tolist()})
    ys = np.array([str(c) for c in y.tolist()], dtype=object)
    out: list[dict[str, Any]] = []
    for s in splits:
        n_train, n_val = int(s.train.size), int(s.val.size)
        tc, vc = Counter(ys[s.train].tolist()), Counter(ys[s.val].tolist())
        out.append(
            {
                "fold": int(s.fold),
                "n_train": n_train,
                "n_val": n_val,
                "val_fraction": n_val / (n_train + n_val) if n_train + n_val else 0.0,
                "train_counts": {c: int(tc.get(c, 0)) for c in classes},
                "val_counts": {c: int(vc.get(c, 0)) for c in classes},
            }
        )
    return out


# ----------------------------------------------------------------------------- internals


def _validate_inputs(labels: Any, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    y, g = np.asarray(labels), np.asarray(groups)
    for name, arr in (("labels", y), ("groups", g)):
        if arr.ndim != 1:
            raise ConfigError(f"{name} must be one-dimensional, but got shape {arr.shape}")
        if arr.size == 0:
            raise ConfigError(f"{name} must not be empty, but got 0 entries")
    if y.size != g.size:
        raise ConfigError(
            f"labels and groups must have the same length, but got len(labels)={y.size} and "
            f"len(groups)={g.size}"
        )
    for name, arr in (("labels", y), ("groups", g)):
        bad = [i for i, v in enumerate(arr.tolist()) if _is_missing(v)]
        if bad:
            raise ConfigError(
                f"{name} must not contain empty values (None, NaN or ''), but got "
                f"{len(bad)} at positions {_listing(bad)}"
            )
    if y.dtype == object:
        y = y.astype(str)
    if g.dtype == object:
        g = g.astype(str)
    return y, g


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, str):
        return v.strip() == ""
    return isinstance(v, float) and v != v


def _check_n_folds(n_folds: Any) -> None:
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer):
        raise ConfigError(f"n_folds must be an integer, but got n_folds={n_folds!r}")
    if n_folds < 2:
        raise ConfigError(f"n_folds must be at least 2, but got n_folds={n_folds}")


def _check_holdout(holdout: Any) -> None:
    if isinstance(holdout, bool) or not isinstance(holdout, int | float | np.floating):
        raise ConfigError(f"holdout must be a number in (0, 0.5], but got holdout={holdout!r}")
    if not 0.0 < float(holdout) <= 0.5:
        raise ConfigError(f"holdout must be in (0, 0.5], but got holdout={holdout}")


def _holdout_split(y: np.ndarray, g: np.ndarray, fraction: float, seed: int) -> Split:
    """One grouped split, about ``fraction`` of each class's images in validation.

    ``StratifiedGroupKFold`` can only give fractions ``1/k``, so patients are assigned here: each
    patient is filed under its most frequent label; per label, patients are shuffled and added to
    validation when that brings the label's validation image count closer to its target. Every
    label keeps at least one patient on each side: when no group brings it closer (every one
    is over twice the target, e.g. a hospital holding most of a class), the smallest is taken,
    never a group that would move most of a class out of training.
    """
    rng = np.random.default_rng(seed)
    uniq_g, g_idx = np.unique(g, return_inverse=True)
    uniq_y, y_idx = np.unique(y, return_inverse=True)
    counts = np.zeros((uniq_g.size, uniq_y.size), dtype=np.int64)
    np.add.at(counts, (g_idx, y_idx), 1)
    main_label = counts.argmax(axis=1)  # ties -> first label in sorted order (deterministic)
    sizes = counts.sum(axis=1)
    val_groups = np.zeros(uniq_g.size, dtype=bool)
    for k in range(uniq_y.size):
        members = np.flatnonzero(main_label == k)
        if members.size < 2:
            # Every label has >= 2 patients, but they may all be filed under other labels.
            continue
        members = members[rng.permutation(members.size)]
        target = fraction * sizes[members].sum()
        taken = 0
        for gi in members[:-1]:  # the last patient always stays in train
            if abs(taken + sizes[gi] - target) >= abs(taken - target):
                continue
            val_groups[gi] = True
            taken += int(sizes[gi])
        if not taken:
            smallest = min(members, key=lambda gi: (sizes[gi], gi))
            val_groups[smallest] = True
    in_val = val_groups[g_idx]
    return Split(fold=0, train=np.flatnonzero(~in_val), val=np.flatnonzero(in_val))


def _listing(values: list[Any]) -> str:
    shown = ", ".join(repr(v) for v in values[:_MAX_LISTED])
    more = f", ... ({len(values) - _MAX_LISTED} more)" if len(values) > _MAX_LISTED else ""
    return f"[{shown}{more}]"
