"""Mixing sites within a class (issue 23 §1, "anything else"), on frozen pooled features.

The lever: every training image gets partners of its own class from *other* site groups, and
the model also trains on their convex mixtures (lambda ~ Beta(alpha, alpha), the partner's
weight below one half), so within a class the features between hospitals carry the label too
and a direction that only separates hospitals is worth less (intra-class mixup across domains,
as in Xu et al. 2020 and Yao et al. 2022, "LISA"). On cached frozen features it would cost one
extra batch per batch, so it could join the search; this probe asks first whether it moves the
held-out hospitals at all.

Class-balanced L2 logistic regressions on the average-pooled features of the three offline
backbones of selection_probe.py (same extractor), the training images weighted as nothing or as
the searched `source_balance`; mixing off or with alpha 0.4 / 1.0 (2 mixtures per image). Each
configuration is scored by the search's 3 site folds (seed 0, fold mean) and once on
`cohen_sites` and new NIH patients. Nothing is chosen on the external sets. Usage:
    python results/generalisation/robust/mix_probe.py [DATA_DIR]
Writes mix_probe.md and mix_probe.json beside this file.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from probe_data import external_sets
from sklearn.metrics import balanced_accuracy_score as bacc

from automl_cxr.data import load_dataset
from automl_cxr.engine import make_site_splits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from selection_probe import CONFIGS, _features, _fit, weights  # noqa: E402

MIXES = (0.0, 0.4, 1.0)  # alpha of Beta(alpha, alpha); 0 = off
PER_IMAGE = 2
WEIGHTINGS = ("none", "source")
C_GRID = (0.0003, 0.001, 0.01, 0.1)


def mixed(x, y, site, w, alpha, rng):
    """`x, y, w` plus `PER_IMAGE` mixtures per image with a same-class image of another site
    group (the image keeps the larger share; a mixture carries its image's weight)."""
    if alpha == 0:
        return x, y, w
    xs, ys, ws = [x], [y], [w]
    for _ in range(PER_IMAGE):
        partner = np.arange(len(y))
        for c in np.unique(y):
            for s in np.unique(site[y == c]):
                mine = np.flatnonzero((y == c) & (site == s))
                pool = np.flatnonzero((y == c) & (site != s))
                if len(pool):
                    partner[mine] = rng.choice(pool, len(mine))
        lam = rng.beta(alpha, alpha, len(y))
        lam = np.maximum(lam, 1 - lam)[:, None]
        keep = partner != np.arange(len(y))
        xs.append((lam * x + (1 - lam) * x[partner])[keep])
        ys.append(y[keep])
        ws.append(w[keep])
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    data_dir = Path(argv[0]) if argv else Path("data/generalisation")
    train = load_dataset("binary_adult", data_dir)
    cohen, nih = external_sets(train, data_dir)
    y, yc = np.asarray(train.labels), np.asarray(cohen.labels)  # 1 = non-COVID
    site = train.manifest["site"].to_numpy().astype(str)
    source = train.manifest["source"].to_numpy().astype(str)
    patient = train.manifest["patient_id"].to_numpy().astype(str)
    folds = make_site_splits(y, patient, site, n_folds=3, seed=0)[0]
    rows = []
    for backbone, size in CONFIGS:
        f = _features(backbone, size, {"train": train, "cohen": cohen, "nih": nih})
        print(f"{backbone} {size}px features", flush=True)
        x = f["train"]
        for kind in WEIGHTINGS:
            for alpha in MIXES:
                for c in C_GRID:
                    rng = np.random.default_rng(0)
                    scores = []
                    for s in folds:
                        w = weights(y[s.train], source[s.train], site[s.train], kind)
                        xm, ym, wm = mixed(x[s.train], y[s.train], site[s.train], w, alpha, rng)
                        scores.append(bacc(y[s.val], _fit(xm, ym, wm, c)(x[s.val])))
                    xm, ym, wm = mixed(x, y, site, weights(y, source, site, kind), alpha, rng)
                    g = _fit(xm, ym, wm, c)
                    rows.append(
                        {
                            "backbone": backbone,
                            "size": size,
                            "weighting": kind,
                            "alpha": alpha,
                            "C": c,
                            "site_cv": float(np.mean(scores)),
                            "cohen_sites": float(bacc(yc, g(f["cohen"]))),
                            "nih_specificity": float(np.mean(g(f["nih"]) == 1)),
                        }
                    )
    (HERE / "mix_probe.json").write_text(json.dumps({"configurations": rows}, indent=2) + "\n")
    lines = [
        "Best C of each by site CV (the search's estimate); mean over the 4 C values beside it:",
        "",
        "| backbone | px | weighting | mixing alpha | C | site CV | cohen_sites | nih spec. | "
        "mean site CV over C | mean cohen_sites over C |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backbone, size in CONFIGS:
        for kind in WEIGHTINGS:
            for alpha in MIXES:
                sub = [
                    r
                    for r in rows
                    if (r["backbone"], r["size"], r["weighting"], r["alpha"])
                    == (backbone, size, kind, alpha)
                ]
                b = max(sub, key=lambda r: r["site_cv"])
                lines.append(
                    f"| {backbone} | {size} | {kind} | {alpha:g} | {b['C']} | "
                    f"{b['site_cv']:.3f} | {b['cohen_sites']:.3f} | {b['nih_specificity']:.3f} | "
                    f"{np.mean([r['site_cv'] for r in sub]):.3f} | "
                    f"{np.mean([r['cohen_sites'] for r in sub]):.3f} |"
                )
    lines += ["", "Mixing on vs off, paired over backbone x weighting x C (24 pairs each):", ""]
    lines += [
        "| alpha | Δ site CV (mean) | Δ cohen_sites (mean) | cohen_sites up in | Δ nih spec. |"
    ]
    lines += ["| ---: | ---: | ---: | ---: | ---: |"]
    off = {(r["backbone"], r["weighting"], r["C"]): r for r in rows if r["alpha"] == 0}
    for alpha in MIXES[1:]:
        on = [r for r in rows if r["alpha"] == alpha]
        d = [(r, off[(r["backbone"], r["weighting"], r["C"])]) for r in on]
        dc = [a["cohen_sites"] - b["cohen_sites"] for a, b in d]
        lines.append(
            f"| {alpha:g} | {np.mean([a['site_cv'] - b['site_cv'] for a, b in d]):+.3f} | "
            f"{np.mean(dc):+.3f} | {sum(v > 0 for v in dc)} of {len(dc)} | "
            f"{np.mean([a['nih_specificity'] - b['nih_specificity'] for a, b in d]):+.3f} |"
        )
    (HERE / "mix_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
