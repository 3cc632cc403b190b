"""A probe of test-time BatchNorm adaptation (AdaBN) on frozen features of `binary_adult`.

AdaBN re-estimates every BatchNorm layer's mean and variance on unlabelled images of the new
hospital before predicting. On a frozen backbone the consistent form is: training features
computed with the statistics of the training images, each evaluation set's features with the
statistics of that set. Compared here with the frozen ImageNet statistics (what the search
uses today), for each (backbone, size) with offline ImageNet weights and a class-balanced
L2 logistic regression on average-pooled features:

- site CV: the search's own 3 site folds (``make_site_splits``, seed 0); with AdaBN each
  training fold's features use its own statistics and each validation fold's use its own
  (labels never seen);
- ``cohen_sites`` (24 Cohen hospitals no training image comes from, adapted on the whole set)
  and ``nih_holdout`` (new NIH patients, non-COVID only: adapting on one class is the extreme
  label shift AdaBN is known to suffer from, so the row shows that failure);
- the ensemble: the mean probability of the backbones, each at its own site-CV-chosen C.

Nothing is chosen on the external sets. Usage:
    python results/generalisation/robust/adapt_probe.py [DATA_DIR]
Writes adapt_probe.md and adapt_probe.json beside this file.
"""

from __future__ import annotations

import copy
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
from sklearn.preprocessing import StandardScaler

from automl_cxr.data import load_dataset
from automl_cxr.engine import make_site_splits
from automl_cxr.models import ModelConfig, build_model

HERE = Path(__file__).resolve().parent
CONFIGS = (
    ("tf_efficientnet_lite1", 128),
    ("mobilenetv2_100", 224),
    ("tf_efficientnet_lite2", 260),
)
C_GRID = (0.0003, 0.001, 0.01, 0.1)


def _batches(imgs, idx):
    for i in range(0, len(idx), 64):
        yield torch.from_numpy(np.asarray(imgs[idx[i : i + 64]])).float()[:, None] / 255.0


@torch.no_grad()
def _pooled(model, imgs, idx, stats_idx=None) -> np.ndarray:
    """Average-pooled features of ``imgs[idx]``; BatchNorm statistics of ``imgs[stats_idx]``."""
    if stats_idx is not None:
        model = copy.deepcopy(model)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        for x in _batches(imgs, stats_idx):
            model.forward_features(x)
        model.eval()
    return np.concatenate(
        [model.forward_features(x).mean((2, 3)).numpy() for x in _batches(imgs, idx)]
    )


def _fit(xtr, ytr, c):
    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(
        sc.transform(xtr), ytr
    )
    return lambda x: clf.predict_proba(sc.transform(x))[:, 1]


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    data_dir = Path(argv[0]) if argv else Path("data/generalisation")
    train = load_dataset("binary_adult", data_dir)
    cohen, nih = external_sets(train, data_dir)
    assert train.classes == cohen.classes == ["covid", "non_covid"], train.classes
    y = np.asarray(train.labels)  # 1 = non-COVID
    yc = np.asarray(cohen.labels)
    site = train.manifest["site"].to_numpy().astype(str)
    patient = train.manifest["patient_id"].to_numpy().astype(str)
    folds, _ = make_site_splits(y, patient, site, n_folds=3, seed=0)
    rows, probs = [], {}
    for backbone, size in CONFIGS:
        t0 = time.perf_counter()
        model = build_model(ModelConfig(backbone=backbone, num_classes=2, frozen_stages=0)).eval()
        it, ic, inn = train.images(size), cohen.images(size), nih.images(size)
        all_t, all_c, all_n = (np.arange(len(a)) for a in (it, ic, inn))
        feats = {
            "imagenet": {
                "train": _pooled(model, it, all_t),
                "cohen": _pooled(model, ic, all_c),
                "nih": _pooled(model, inn, all_n),
            },
            "adabn": {
                "train": _pooled(model, it, all_t, all_t),
                "cohen": _pooled(model, ic, all_c, all_c),
                "nih": _pooled(model, inn, all_n, all_n),
            },
        }
        fold_feats = {
            "imagenet": [
                (feats["imagenet"]["train"][s.train], feats["imagenet"]["train"][s.val])
                for s in folds
            ],
            "adabn": [
                (_pooled(model, it, s.train, s.train), _pooled(model, it, s.val, s.val))
                for s in folds
            ],
        }
        print(f"{backbone} {size}px features in {time.perf_counter() - t0:.0f} s", flush=True)
        for mode in ("imagenet", "adabn"):
            best = None
            for c in C_GRID:
                oof = []
                cv = []
                for s, (xtr, xva) in zip(folds, fold_feats[mode], strict=True):
                    p = _fit(xtr, y[s.train], c)(xva)
                    oof.append(p)
                    cv.append(balanced_accuracy_score(y[s.val], (p >= 0.5).astype(int)))
                f = _fit(feats[mode]["train"], y, c)
                pc, pn = f(feats[mode]["cohen"]), f(feats[mode]["nih"])
                row = {
                    "backbone": backbone,
                    "size": size,
                    "bn": mode,
                    "C": c,
                    "site_cv": float(np.mean(cv)),
                    "site_cv_folds": [round(float(v), 3) for v in cv],
                    "cohen_sites": float(balanced_accuracy_score(yc, (pc >= 0.5).astype(int))),
                    "nih_specificity": float(np.mean(pn >= 0.5)),
                }
                rows.append(row)
                if best is None or row["site_cv"] > best[0]["site_cv"]:
                    best = (row, oof, pc, pn)
            probs[(backbone, size, mode)] = best
    ens = []
    for mode in ("imagenet", "adabn"):
        members = [probs[(b, s, mode)] for b, s in CONFIGS]
        cv = [
            balanced_accuracy_score(
                y[s.val], (np.mean([m[1][i] for m in members], 0) >= 0.5).astype(int)
            )
            for i, s in enumerate(folds)
        ]
        pc = np.mean([m[2] for m in members], 0)
        pn = np.mean([m[3] for m in members], 0)
        ens.append(
            {
                "bn": mode,
                "site_cv": float(np.mean(cv)),
                "site_cv_folds": [round(float(v), 3) for v in cv],
                "cohen_sites": float(balanced_accuracy_score(yc, (pc >= 0.5).astype(int))),
                "nih_specificity": float(np.mean(pn >= 0.5)),
            }
        )
    (HERE / "adapt_probe.json").write_text(
        json.dumps({"rows": rows, "ensemble": ens}, indent=2) + "\n"
    )
    lines = [
        "| backbone | px | BatchNorm statistics | C (by site CV) | site CV (folds) | cohen_sites | "
        "nih spec. | mean cohen_sites, all C |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for backbone, size in CONFIGS:
        for mode in ("imagenet", "adabn"):
            r = probs[(backbone, size, mode)][0]
            sub = [
                q
                for q in rows
                if q["backbone"] == backbone and q["size"] == size and q["bn"] == mode
            ]
            lines.append(
                f"| {backbone} | {size} | {mode} | {r['C']} | {r['site_cv']:.3f} "
                f"({', '.join(f'{v:.2f}' for v in r['site_cv_folds'])}) | {r['cohen_sites']:.3f} | "
                f"{r['nih_specificity']:.3f} | {np.mean([q['cohen_sites'] for q in sub]):.3f} |"
            )
    for e in ens:
        lines.append(
            f"| ensemble of the {len(CONFIGS)} | – | {e['bn']} | – | {e['site_cv']:.3f} "
            f"({', '.join(f'{v:.2f}' for v in e['site_cv_folds'])}) | {e['cohen_sites']:.3f} | "
            f"{e['nih_specificity']:.3f} | – |"
        )
    (HERE / "adapt_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
