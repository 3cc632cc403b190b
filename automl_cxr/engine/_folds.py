"""A dataset's folds for a trial: the patient- or site-grouped CV splits (cached per dataset
and settings), the inner early-stopping split of a fold, row identities and sites."""

from __future__ import annotations

import hashlib

import numpy as np

from automl_cxr.data import PreparedDataset
from automl_cxr.engine._config import TrainConfig
from automl_cxr.engine._splits import make_site_splits, make_splits
from automl_cxr.errors import ConfigError

__all__ = [
    "dataset_sites",
    "dataset_splits",
    "group_balance_weights",
    "inner_split",
    "row_identities",
    "trial_splits",
]


def inner_split(
    dataset: PreparedDataset, train_idx: np.ndarray, cfg: TrainConfig, fold: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Early-stopping split of a fold's training rows (`fold` None: of a model trained on
    all of them, for export): patient-grouped, stratified, about `cfg.inner_holdout` of each
    class's training images. Returns absolute (fit, inner_val)."""
    labels = dataset.manifest["label"].to_numpy()[train_idx]
    try:
        (sp,) = make_splits(
            labels,
            dataset.groups[train_idx],
            holdout=cfg.inner_holdout,
            seed=cfg.seed + (fold or 0),
        )
    except ConfigError as exc:
        whose = "the retrained model's" if fold is None else f"fold {fold}'s"
        raise ConfigError(
            f"early stopping needs an inner validation split of {whose} training patients, "
            f"but {exc}; use early_stopping=None or more data"
        ) from None
    return train_idx[sp.train], train_idx[sp.val]


def dataset_sites(dataset: PreparedDataset) -> tuple[np.ndarray, list[str]]:
    """The manifest's `site` of each image (missing ones as `<source>:unknown`, one site per
    source, with a warning) for site-held-out folds."""
    m = dataset.manifest
    if "site" not in m.columns:
        raise ConfigError(
            f"cv='site' needs a 'site' column in dataset {dataset.name!r}'s manifest, but it has "
            f"{sorted(m.columns)}; prepare it again with a version that records sites, or use "
            "cv='patient'"
        )
    site = m["site"].astype("string").fillna("").str.strip()
    missing = (site == "").to_numpy()
    warnings: list[str] = []
    if missing.any():
        fill = m["source"].astype(str).to_numpy()[missing]
        site = site.to_numpy(dtype=object)
        site[missing] = [f"{src}:unknown" for src in fill]
        warnings.append(
            f"{int(missing.sum())} images have no site; each source's are treated as one site "
            "(<source>:unknown)"
        )
    return np.asarray(site, dtype=object).astype(str), warnings


_SPLITS: dict[tuple, tuple[list, list[str]]] = {}


def dataset_splits(
    dataset: PreparedDataset, cv: str, n_folds: int, holdout: float | None, seed: int
) -> tuple[list, list[str]]:
    """The grouped folds of a dataset and any warnings, computed once per (content, cv, K,
    holdout, seed): every trial of a search evaluates on the same folds, and
    StratifiedGroupKFold takes ~1 s."""
    sites, warnings = dataset_sites(dataset) if cv == "site" else (None, [])
    # the content hash does not cover the site column (row by row): the folds' key does
    site_key = None if sites is None else hashlib.sha256("\n".join(sites).encode()).hexdigest()
    key = (dataset.hash, cv, site_key, n_folds, holdout, seed)
    if key not in _SPLITS:
        labels = dataset.manifest["label"].to_numpy()
        if sites is not None:
            splits, more = make_site_splits(
                labels, dataset.groups, sites, n_folds=n_folds, holdout=holdout, seed=seed
            )
            _SPLITS[key] = (splits, warnings + more)
        else:
            splits = make_splits(
                labels, dataset.groups, n_folds=n_folds, holdout=holdout, seed=seed
            )
            _SPLITS[key] = (splits, [])
    return _SPLITS[key]


def trial_splits(dataset: PreparedDataset, cfg: TrainConfig) -> tuple[list, list[str]]:
    """The folds a configuration trains on: the dataset's splits, the first `max_folds`."""
    splits, warnings = dataset_splits(dataset, cfg.cv, cfg.n_folds, cfg.holdout, cfg.seed)
    return (splits if cfg.max_folds is None else splits[: cfg.max_folds]), list(warnings)


def row_identities(dataset: PreparedDataset) -> np.ndarray:
    """A process-independent identity per row: the image's sha256 (its path when the
    manifest has none), with `#k` appended to the k-th repeat of an identity."""
    m = dataset.manifest
    ids = (m["sha256"] if "sha256" in m.columns else m["path"]).astype(str)
    k = ids.groupby(ids).cumcount().to_numpy()
    base = ids.to_numpy(dtype=object)
    return np.array([b if j == 0 else f"{b}#{j}" for b, j in zip(base, k, strict=True)])


def group_balance_weights(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-row weights (float64) in which, within each class, every group (an image source, a
    site) carries the same total weight and the class keeps its row count: `source_balance`."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    w = np.zeros(len(labels))
    for c in np.unique(labels):
        in_c = labels == c
        names, counts = np.unique(groups[in_c], return_counts=True)
        share = in_c.sum() / len(names)
        for name, n in zip(names, counts, strict=True):
            w[in_c & (groups == name)] = share / n
    return w
