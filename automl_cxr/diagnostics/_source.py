"""Image-based source probe: can a simple model tell where an X-ray came from by its pixels?

If it can, *and* the manifest aligns source with label (the paper's recipes take every COVID-19
image from one collection and every other class from another), a classifier can score well by
recognising the source (hospital, scanner, burnt-in markers, patient age) instead of the disease
(DeGrave et al. 2021, Nat Mach Intell 3:610-619). Either alone is harmless: a recognisable source
whose images hold every class in similar shares is no shortcut, and an aligned source that leaves
no trace in the pixels cannot be exploited.

The probe is deliberately simple: standardised 32x32 thumbnails, L2-regularised logistic
regression, patient-grouped stratified K-fold, out-of-fold ROC-AUC (one-vs-rest macro average
with more than two sources). A simple probe that succeeds is strong evidence; one that fails
does not prove a deep network could not find subtler cues.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from automl_cxr.data import ALIGNMENT_WARN_AT, PreparedDataset, source_label_alignment
from automl_cxr.errors import ConfigError

__all__ = [
    "PROBE_WARN_AUC",
    "probe_thumbnails",
    "shortcut_warning",
    "source_diagnostics",
    "source_probe",
]

PROBE_WARN_AUC = 0.9
"""Out-of-fold ROC-AUC of the source probe at or above which the source counts as predictable."""


def probe_thumbnails(images: np.ndarray, size: int = 32) -> np.ndarray:
    """(N, H, W) uint8 images → (N, size*size) float32 thumbnails in [0, 1] (bilinear)."""
    arr = np.asarray(images)
    if arr.ndim != 3:
        raise ConfigError(f"images must have shape (N, H, W), but got shape {arr.shape}")
    if size < 4:
        raise ConfigError(f"probe thumbnail size must be at least 4 px, but got size={size}")
    if arr.shape[1:] == (size, size):
        out = arr.astype(np.float32)
    else:
        out = (
            np.stack(
                [
                    np.asarray(
                        Image.fromarray(np.ascontiguousarray(im, dtype=np.uint8)).resize(
                            (size, size), Image.Resampling.BILINEAR, reducing_gap=2.0
                        ),
                        dtype=np.float32,
                    )
                    for im in arr
                ]
            )
            if len(arr)
            else np.zeros((0, size, size), np.float32)
        )
    return (out / 255.0).reshape(len(arr), size * size)


def _folds_possible(y: np.ndarray, groups: np.ndarray) -> int:
    """Folds each source can fill: the fewest distinct groups any source has."""
    return int(min(len(set(groups[y == k])) for k in np.unique(y)))


def source_probe(
    images: np.ndarray,
    sources: np.ndarray | list[str],
    groups: np.ndarray | list[str] | None = None,
    *,
    size: int = 32,
    n_folds: int = 5,
    seed: int = 0,
    c: float = 0.01,
    max_images: int = 4000,
) -> dict[str, Any]:
    """How well the image *source* is predicted from pixels alone.

    Args:
        images: (N, H, W) uint8 radiographs (any square size; thumbnails of `size` are taken).
        sources: the source of each image.
        groups: patient / split group of each image (folds never split a group); None = each
            image its own group.
        n_folds: at most this many folds (fewer when a source has fewer groups).
        max_images: above this many images a group-wise random sample is probed (speed).

    Returns a plain dict: ``auc`` (pooled out-of-fold ROC-AUC; None when it cannot be
    computed), ``auc_folds``, ``auc_mean``, ``auc_std``, ``balanced_accuracy``, ``sources``
    (images per source), ``n_images``, ``n_folds``, ``method``, ``predictable`` (auc >=
    PROBE_WARN_AUC) and ``note`` (why the probe could not run, else None).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    src = np.asarray(sources).astype(str)
    imgs = np.asarray(images)
    if len(src) != len(imgs):
        raise ConfigError(
            f"sources must have one entry per image ({len(imgs)}), but got {len(src)}"
        )
    grp = np.arange(len(src)).astype(str) if groups is None else np.asarray(groups).astype(str)
    if len(grp) != len(src):
        raise ConfigError(f"groups must have one entry per image ({len(src)}), but got {len(grp)}")
    if n_folds < 2:
        raise ConfigError(f"n_folds must be at least 2, but got n_folds={n_folds}")
    counts = {str(k): int(v) for k, v in pd.Series(src).value_counts().sort_index().items()}
    method = (
        f"logistic regression (C={c:g}) on standardised {size}x{size} thumbnails, "
        "patient-grouped stratified K-fold, out-of-fold ROC-AUC"
    )
    result: dict[str, Any] = {
        "method": method,
        "size": size,
        "sources": counts,
        "n_images": len(src),
        "n_folds": 0,
        "auc": None,
        "auc_folds": [],
        "auc_mean": None,
        "auc_std": None,
        "balanced_accuracy": None,
        "chance_auc": 0.5,
        "warn_at": PROBE_WARN_AUC,
        "predictable": False,
        "note": None,
    }
    if len(counts) < 2:
        result["note"] = f"only one source ({', '.join(counts) or 'none'}): nothing to tell apart"
        return result
    if len(src) > max_images:  # a group-wise sample keeps the probe to seconds
        rng = np.random.default_rng(seed)
        uniq = np.unique(grp)
        rng.shuffle(uniq)
        keep_groups, total = [], 0
        sizes = pd.Series(grp).value_counts()
        for g in uniq:
            if total >= max_images:
                break
            keep_groups.append(g)
            total += int(sizes[g])
        keep = np.isin(grp, keep_groups)
        imgs, src, grp = imgs[keep], src[keep], grp[keep]
        result["n_images_probed"] = int(keep.sum())
    names = sorted(set(src))
    y = np.searchsorted(names, src)
    k = min(n_folds, _folds_possible(y, grp))
    if k < 2:
        result["note"] = (
            "a source has fewer than 2 patients (split groups): a patient-grouped probe "
            "cannot be cross-validated"
        )
        return result
    x = probe_thumbnails(imgs, size)
    oof = np.zeros((len(y), len(names)), dtype=np.float64)
    fold_auc: list[float] = []
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    # One BLAS thread: the problem is small, and many threads on a busy machine are far slower.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")  # convergence / small-class warnings on tiny folds
        for tr, va in splitter.split(x, y, grp):
            if len(set(y[tr])) < len(names):
                continue  # a fold whose training part lacks a source cannot score it
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))
            clf.fit(x[tr], y[tr])
            p = clf.predict_proba(x[va])
            oof[va] = p
            fa = _auc(y[va], p, len(names), roc_auc_score)
            if fa is not None:
                fold_auc.append(fa)
    seen = oof.sum(axis=1) > 0
    auc = _auc(y[seen], oof[seen], len(names), roc_auc_score) if seen.any() else None
    result.update(
        n_folds=k,
        auc=None if auc is None else round(auc, 4),
        auc_folds=[round(a, 4) for a in fold_auc],
        auc_mean=round(float(np.mean(fold_auc)), 4) if fold_auc else None,
        auc_std=round(float(np.std(fold_auc, ddof=1)), 4) if len(fold_auc) > 1 else None,
        balanced_accuracy=(
            round(float(balanced_accuracy_score(y[seen], oof[seen].argmax(axis=1))), 4)
            if seen.any()
            else None
        ),
        predictable=bool(auc is not None and auc >= PROBE_WARN_AUC),
    )
    if auc is None:
        result["note"] = "the folds left a source without images: no AUC could be computed"
    return result


def _auc(y: np.ndarray, p: np.ndarray, n: int, roc_auc_score) -> float | None:
    present = np.unique(y)
    if len(present) < 2:
        return None
    if n == 2:
        return float(roc_auc_score(y == 1, p[:, 1]))
    scores = [float(roc_auc_score(y == k, p[:, k])) for k in present]
    value = float(np.mean(scores))
    return value if math.isfinite(value) else None


def shortcut_warning(probe: dict[str, Any], alignment: dict[str, Any]) -> str | None:
    """The plain-language warning when the pixels give the source away *and* the source gives
    the label away; None otherwise."""
    aligned = alignment.get("cramers_v", 0.0) >= ALIGNMENT_WARN_AT or bool(
        alignment.get("confounded_classes")
    )
    if not (probe.get("predictable") and aligned):
        return None
    side = probe.get("size", 32)
    return (
        f"the image source is predictable from the pixels alone (ROC-AUC {probe['auc']:.2f} "
        f"from {side}x{side} thumbnails) and source and label are "
        f"aligned (Cramér's V = {alignment.get('cramers_v', 0.0):.2f}): a classifier can score "
        "high by recognising where an image came from (hospital, scanner, markers, patient "
        "age) instead of the disease. Treat high scores as a likely shortcut; check the "
        "lung-blanked control (`diagnose --control`) and validate on an external set "
        "(DeGrave et al. 2021)"
    )


def source_diagnostics(
    dataset: PreparedDataset,
    *,
    resolution: int = 64,
    size: int = 32,
    n_folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Source-label alignment of the manifest plus the image-based source probe.

    Images are read at `resolution` (use the study's, whose cache already exists) and shrunk to
    `size` thumbnails. Returns ``{"alignment", "probe", "warning", "warnings"}``: ``warning`` is
    the combined shortcut warning (None when quiet), ``warnings`` the one to show: the combined
    warning, else the alignment warning alone (it fires on the manifest, even when the probe is
    inconclusive).
    """
    manifest = dataset.manifest
    alignment = source_label_alignment(manifest)
    probe = source_probe(
        np.asarray(dataset.images(resolution)),
        manifest["source"].astype(str).to_numpy(),
        dataset.groups,
        size=size,
        n_folds=n_folds,
        seed=seed,
    )
    warning = shortcut_warning(probe, alignment)
    # the combined warning says all the alignment warning says (and what the pixels add)
    shown = warning or alignment.get("warning")
    warns = [shown] if shown else []
    return {
        "dataset": dataset.name,
        "dataset_hash": dataset.hash,
        "alignment": alignment,
        "probe": probe,
        "warning": warning,
        "warnings": warns,
    }
