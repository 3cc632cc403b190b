"""Two more questions about `binary_adult --cv site`, on frozen pooled features (2026-12-06):

1. **How much NIH should the non-COVID class get?** Class-balanced L2 logistic regressions on
   the average-pooled ImageNet features of three offline backbones, with the training images
   weighted within each class as: nothing (`none`); every source the same total weight
   (`source`, the searched `source_balance`); that, with NIH at a fifth (`nih0.2`) or left out
   (`nih0`, the non-COVID class is then Cohen's 64 films only); every site group the same
   total weight (`site`); each image 1/sqrt(its site group's size) (`sqrt_site`).
2. **Which site-held-out estimate ranks models for a new hospital?** For every configuration,
   the search's 3 site folds (seed 0) scored as the search does (the mean of the folds'
   balanced accuracies) and pooled (one balanced accuracy over all out-of-fold predictions),
   each also averaged over 5 fold seeds; their correlation with `cohen_sites` over the
   configurations. Then the same two rankings of the real search trials of the studies in
   this folder (their stored out-of-fold predictions), which is the check that counts: a
   probe over three backbones has in effect three points.

Nothing is chosen on the external sets. Usage (features as in feature_probe.py):
    python results/generalisation/robust/selection_probe.py [DATA_DIR]
Writes selection_probe.md and selection_probe.json beside this file.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from probe_data import external_sets
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score as bacc
from sklearn.preprocessing import StandardScaler

from automl_cxr.data import load_dataset
from automl_cxr.engine import group_balance_weights, make_site_splits
from automl_cxr.models import ModelConfig, build_model
from automl_cxr.oof import load_study_oof
from automl_cxr.study import external_attr_key, load_study

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adapt_probe import _pooled  # noqa: E402  (the same extractor as the AdaBN probe)

CONFIGS = (
    ("tf_efficientnet_lite1", 128),
    ("mobilenetv2_100", 224),
    ("tf_efficientnet_lite2", 260),
)
WEIGHTINGS = ("none", "source", "nih0.2", "nih0", "site", "sqrt_site")
C_GRID = (0.0003, 0.001, 0.01, 0.1)
SEEDS = 5
STUDIES = (
    "none_site",
    "balance_site",
    "roi_site",
    "intensity_site",
    "adversarial_site",
    "robust_site",
    "resolution_site",
)


def _features(backbone: str, size: int, datasets: dict) -> dict[str, np.ndarray]:
    """Average-pooled frozen ImageNet features of every dataset (adapt_probe's extractor)."""
    model = build_model(ModelConfig(backbone=backbone, num_classes=2, frozen_stages=0)).eval()
    out = {}
    for key, ds in datasets.items():
        imgs = ds.images(size)
        out[key] = _pooled(model, imgs, np.arange(len(imgs)))
    return out


def weights(y: np.ndarray, source: np.ndarray, site: np.ndarray, kind: str) -> np.ndarray:
    """Per-image training weights of `kind`; each class then sums to half the total."""
    w = np.ones(len(y))
    if kind in ("source", "nih0.2", "nih0", "site"):  # the searched source_balance's rule
        w = group_balance_weights(y, site if kind == "site" else source)
        if kind in ("nih0.2", "nih0"):
            w[source == "nih"] *= 0.2 if kind == "nih0.2" else 0.0
    elif kind == "sqrt_site":
        for c in np.unique(y):
            inc = y == c
            names, counts = np.unique(site[inc], return_counts=True)
            for name, n in zip(names, counts, strict=True):
                w[inc & (site == name)] = 1 / np.sqrt(n)
    for c in np.unique(y):
        inc = y == c
        w[inc] *= len(y) / 2 / w[inc].sum()
    return w


def _fit(x, y, w, c):
    keep = w > 0
    sc = StandardScaler().fit(x[keep])
    clf = LogisticRegression(C=c, max_iter=3000).fit(
        sc.transform(x[keep]), y[keep], sample_weight=w[keep]
    )
    return lambda z: clf.predict(sc.transform(z))


def _cv(x, y, source, site, folds, kind, c) -> tuple[float, float]:
    """(mean of the folds' balanced accuracies, balanced accuracy of the pooled predictions)."""
    pred = np.zeros(len(y), dtype=int)
    scores = []
    for s in folds:
        p = _fit(
            x[s.train], y[s.train], weights(y[s.train], source[s.train], site[s.train], kind), c
        )(x[s.val])
        pred[s.val] = p
        scores.append(bacc(y[s.val], p))
    return float(np.mean(scores)), float(bacc(y, pred))


def real_trials() -> list[dict]:
    """The complete trials of the site-CV studies here, with both estimates and cohen_sites."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for name in STUDIES:
        db = HERE / f"{name}.db"
        if not db.is_file():
            continue
        study = load_study(str(db))
        oof = load_study_oof(study, str(db))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            coh = t.user_attrs.get(external_attr_key("cohen_sites_binary", "balanced_accuracy"))
            if t.number not in oof or coh is None:
                continue
            o = oof[t.number].valid()
            pred = o.probs.argmax(1)
            rows.append(
                {
                    "study": name,
                    "trial": t.number,
                    "fold_mean": float(t.value),
                    "pooled": float(bacc(o.labels, pred)),
                    "cohen_sites": float(coh),
                }
            )
    return rows


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    data_dir = Path(argv[0]) if argv else Path("data/generalisation")
    train = load_dataset("binary_adult", data_dir)
    cohen, nih = external_sets(train, data_dir)
    assert train.classes == cohen.classes == ["covid", "non_covid"], train.classes
    y, yc = np.asarray(train.labels), np.asarray(cohen.labels)  # 1 = non-COVID
    site = train.manifest["site"].to_numpy().astype(str)
    source = train.manifest["source"].to_numpy().astype(str)
    patient = train.manifest["patient_id"].to_numpy().astype(str)
    fold_sets = [make_site_splits(y, patient, site, n_folds=3, seed=s)[0] for s in range(SEEDS)]
    rows = []
    for backbone, size in CONFIGS:
        f = _features(backbone, size, {"train": train, "cohen": cohen, "nih": nih})
        print(f"{backbone} {size}px features", flush=True)
        for kind in WEIGHTINGS:
            for c in C_GRID:
                est = [_cv(f["train"], y, source, site, folds, kind, c) for folds in fold_sets]
                g = _fit(f["train"], y, weights(y, source, site, kind), c)
                rows.append(
                    {
                        "backbone": backbone,
                        "size": size,
                        "weighting": kind,
                        "C": c,
                        "fold_mean": est[0][0],
                        "pooled": est[0][1],
                        "fold_mean_5_seeds": float(np.mean([e[0] for e in est])),
                        "pooled_5_seeds": float(np.mean([e[1] for e in est])),
                        "cohen_sites": float(bacc(yc, g(f["cohen"]))),
                        "nih_specificity": float(np.mean(g(f["nih"]) == 1)),
                    }
                )
    trials = real_trials()
    (HERE / "selection_probe.json").write_text(
        json.dumps({"configurations": rows, "search_trials": trials}, indent=2) + "\n"
    )
    lines = [
        "Weighting (best C of each by the search's estimate, the fold mean):",
        "",
        "| backbone | px | weighting | C | site CV (fold mean) | cohen_sites | nih spec. | "
        "mean cohen_sites over C |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backbone, size in CONFIGS:
        for kind in WEIGHTINGS:
            sub = [
                r
                for r in rows
                if r["backbone"] == backbone and r["size"] == size and r["weighting"] == kind
            ]
            b = max(sub, key=lambda r: r["fold_mean"])
            lines.append(
                f"| {backbone} | {size} | {kind} | {b['C']} | {b['fold_mean']:.3f} | "
                f"{b['cohen_sites']:.3f} | {b['nih_specificity']:.3f} | "
                f"{np.mean([r['cohen_sites'] for r in sub]):.3f} |"
            )
    coh = np.array([r["cohen_sites"] for r in rows])
    lines += [
        "",
        f"Estimators over the {len(rows)} configurations (the model each picks):",
        "",
        "| estimate | corr. with cohen_sites | picks | its estimate | its cohen_sites "
        "| nih spec. |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for key in ("fold_mean", "pooled", "fold_mean_5_seeds", "pooled_5_seeds"):
        v = np.array([r[key] for r in rows])
        b = rows[int(v.argmax())]
        lines.append(
            f"| {key} | {np.corrcoef(v, coh)[0, 1]:+.2f} | {b['backbone']} {b['size']}, "
            f"{b['weighting']}, C={b['C']} | {v.max():.3f} | {b['cohen_sites']:.3f} | "
            f"{b['nih_specificity']:.3f} |"
        )
    if trials:
        tc = np.array([t["cohen_sites"] for t in trials])
        lines += [
            "",
            f"The {len(trials)} complete trials of the site-CV studies here (stored OOF):",
            "",
            "| estimate | corr. with cohen_sites | studies whose pick changes | "
            "mean cohen_sites of the studies' picks |",
            "| --- | ---: | ---: | ---: |",
        ]
        picks = {}
        for key in ("fold_mean", "pooled"):
            by = {}
            for t in trials:
                if t["study"] not in by or t[key] > by[t["study"]][key]:
                    by[t["study"]] = t
            picks[key] = by
        for key in ("fold_mean", "pooled"):
            v = np.array([t[key] for t in trials])
            changed = sum(
                picks[key][s]["trial"] != picks["fold_mean"][s]["trial"] for s in picks[key]
            )
            lines.append(
                f"| {key} | {np.corrcoef(v, tc)[0, 1]:+.2f} | {changed} of {len(picks[key])} | "
                f"{np.mean([p['cohen_sites'] for p in picks[key].values()]):.3f} |"
            )
    (HERE / "selection_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
