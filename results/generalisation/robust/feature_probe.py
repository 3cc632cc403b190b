"""A probe on frozen pooled features: what moves the held-out-hospital figure of `binary_adult`?

For each (backbone, input size) with offline ImageNet weights, the frozen backbone's pooled
features (average and max over the last feature map) of the recipe and of the external sets;
then L2-regularised logistic regressions (class-balanced) under site-held-out CV (the search's
own 3 folds, `make_site_splits`, seed 0), with and without two levers the searched ones do not
cover:

- **class-conditional site erasure** (in the spirit of LEACE / INLP concept erasure): the top-k
  directions of the per-(class, site) mean differences are projected out of the features, so a
  linear model cannot read what tells training sites apart within a class;
- **anchored site CV** (an estimator, not a model): NIH, the only non-COVID site of any size,
  always stays in training and only Cohen sites rotate through validation, so no fold trains
  without the dominant non-COVID site.

Each configuration is chosen by its site-CV score and then scored once on `cohen_sites` (24
Cohen hospitals no training image comes from) and `nih_holdout` (new NIH patients: specificity).
Nothing is chosen on the external sets: the table lists every configuration, sorted by CV.

Usage: python results/generalisation/robust/feature_probe.py [DATA_DIR]
Writes feature_probe.md and feature_probe.json beside this file.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from probe_data import external_sets
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from automl_cxr.data import load_dataset
from automl_cxr.engine import make_site_splits
from automl_cxr.models import ModelConfig, build_model

HERE = Path(__file__).resolve().parent
CONFIGS = (
    ("tf_efficientnet_lite1", 128),  # the searches' backbone and size (ROBUST.md)
    ("tf_efficientnet_lite1", 224),
    ("mobilenetv2_100", 224),
    ("tf_efficientnet_lite2", 260),  # Lite2 at its native size
)
C_GRID = (0.0003, 0.001, 0.01, 0.1)
ERASE = (0, 4, 16)


def _features(backbone: str, size: int, datasets: dict) -> dict[str, np.ndarray]:
    model = build_model(ModelConfig(backbone=backbone, num_classes=2, frozen_stages=0)).eval()
    out = {}
    with torch.no_grad():
        for key, ds in datasets.items():
            imgs = ds.images(size)
            parts = []
            for i in range(0, len(imgs), 64):
                x = torch.from_numpy(np.asarray(imgs[i : i + 64])).float()[:, None] / 255.0
                f = model.forward_features(x)
                parts.append(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1).numpy())
            out[key] = np.concatenate(parts)
    return out


def anchored_folds(
    y: np.ndarray, site: np.ndarray, k: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) of anchored site CV: NIH always trains, the other rows
    rotate through `k` site-grouped, stratified folds."""
    anchor = site == "nih"
    rest = np.flatnonzero(~anchor)
    cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    return [
        (np.concatenate([rest[tr], np.flatnonzero(anchor)]), rest[va])
        for tr, va in cv.split(rest, y[rest], site[rest])
    ]


def _erasure(x: np.ndarray, y: np.ndarray, sites: np.ndarray, k: int) -> np.ndarray:
    """(D, k) orthonormal directions of the count-weighted (class, site) mean differences."""
    vecs = []
    for c in np.unique(y):
        m = y == c
        mu = x[m].mean(0)
        for s in np.unique(sites[m]):
            mm = m & (sites == s)
            if mm.sum() >= 3:
                vecs.append((x[mm].mean(0) - mu) * np.sqrt(mm.sum()))
    _, _, vt = np.linalg.svd(np.array(vecs), full_matrices=False)
    return vt[:k].T


def _fit_predict(xtr, ytr, str_, tests, c: float, k: int) -> list[np.ndarray]:
    sc = StandardScaler().fit(xtr)
    xtr, tests = sc.transform(xtr), [sc.transform(t) for t in tests]
    if k:
        p = _erasure(xtr, ytr, str_, k)
        xtr, tests = xtr - xtr @ p @ p.T, [t - t @ p @ p.T for t in tests]
    clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(xtr, ytr)
    return [clf.predict(t) for t in tests]


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    data_dir = Path(argv[0]) if argv else Path("data/generalisation")
    train = load_dataset("binary_adult", data_dir)
    cohen, nih = external_sets(train, data_dir)
    assert train.classes == cohen.classes == ["covid", "non_covid"], train.classes
    y = train.labels
    site = train.manifest["site"].to_numpy().astype(str)
    patient = train.manifest["patient_id"].to_numpy().astype(str)
    folds, _ = make_site_splits(y, patient, site, n_folds=3, seed=0)
    anchored = anchored_folds(y, site, 3, 0)
    rows = []
    for backbone, size in CONFIGS:
        t0 = time.perf_counter()
        f = _features(backbone, size, {"train": train, "cohen": cohen, "nih": nih})
        print(f"{backbone} {size}px features in {time.perf_counter() - t0:.0f} s", flush=True)
        half = f["train"].shape[1] // 2
        for pool in ("avg", "avgmax"):
            x, xc, xn = (
                f[k] if pool == "avgmax" else f[k][:, :half] for k in ("train", "cohen", "nih")
            )
            for k in ERASE:
                for c in C_GRID:
                    cv = [
                        balanced_accuracy_score(
                            y[s.val],
                            _fit_predict(x[s.train], y[s.train], site[s.train], [x[s.val]], c, k)[
                                0
                            ],
                        )
                        for s in folds
                    ]
                    anc = [
                        balanced_accuracy_score(
                            y[va], _fit_predict(x[tr], y[tr], site[tr], [x[va]], c, k)[0]
                        )
                        for tr, va in anchored
                    ]
                    pc, pn = _fit_predict(x, y, site, [xc, xn], c, k)
                    rows.append(
                        {
                            "backbone": backbone,
                            "size": size,
                            "pool": pool,
                            "erase_k": k,
                            "C": c,
                            "site_cv": float(np.mean(cv)),
                            "site_cv_folds": [round(float(v), 3) for v in cv],
                            "anchored_cv": float(np.mean(anc)),
                            "cohen_sites": float(balanced_accuracy_score(cohen.labels, pc)),
                            "nih_specificity": float(np.mean(pn == 1)),
                        }
                    )
    (HERE / "feature_probe.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| backbone | px | best config by site CV (pool, erase k, C) | site CV | anchored CV | "
        "cohen_sites | nih spec. | mean cohen_sites, all configs | erase k=16 − k=0 (mean) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backbone, size in CONFIGS:
        sub = [r for r in rows if r["backbone"] == backbone and r["size"] == size]
        best = max(sub, key=lambda r: r["site_cv"])
        d = np.mean([r["cohen_sites"] for r in sub if r["erase_k"] == 16]) - np.mean(
            [r["cohen_sites"] for r in sub if r["erase_k"] == 0]
        )
        lines.append(
            f"| {backbone} | {size} | {best['pool']}, {best['erase_k']}, {best['C']} | "
            f"{best['site_cv']:.3f} | {best['anchored_cv']:.3f} | {best['cohen_sites']:.3f} | "
            f"{best['nih_specificity']:.3f} | {np.mean([r['cohen_sites'] for r in sub]):.3f} | "
            f"{d:+.3f} |"
        )
    corr = np.corrcoef([r["site_cv"] for r in rows], [r["cohen_sites"] for r in rows])[0, 1]
    corr_a = np.corrcoef([r["anchored_cv"] for r in rows], [r["cohen_sites"] for r in rows])[0, 1]
    lines += [
        "",
        f"Over all {len(rows)} configurations: corr(site CV, cohen_sites) = {corr:+.2f}, "
        f"corr(anchored CV, cohen_sites) = {corr_a:+.2f}.",
    ]
    (HERE / "feature_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
