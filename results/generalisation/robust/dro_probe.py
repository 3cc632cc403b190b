"""Group DRO against the hospital shortcut, on frozen pooled features (2026-12-07).

Group distributionally robust optimisation (Sagawa et al. 2020, "Distributionally robust neural
networks for group shifts") trains a classifier to minimise the loss of its *worst* group
instead of the average: when a shortcut (here: "a figure-quality Cohen image is COVID-19, an
NIH export is not") serves most images, the group where it fails (Cohen's non-COVID films)
carries the loss, and the exponentiated-gradient group weights raise it until the classifier
stops relying on the shortcut. With groups = (source, class) it is the adaptive version of the
searched `source_balance` (a fixed weight per group); with groups = (site group, class) it
asks for the worst hospital.

On the average-pooled ImageNet features of the three offline backbones (adapt_probe's
extractor), a linear classifier on standardised features, full-batch Adam, L2 penalty `wd`
(Sagawa et al.: DRO needs strong regularisation), compared with the same classifier trained on
the mean loss with the `source_balance` weights (ERM). Scored by the search's 3 site folds
(seed 0, the fold mean the search uses) and once on the external sets. Nothing is chosen on the
external sets: the table's "best by site CV" picks each method's penalty by site CV.

    python results/generalisation/robust/dro_probe.py [DATA_DIR]

Writes dro_probe.md and dro_probe.json beside this file. Features are kept in
`~/.cache/automl-cxr/probe-features` (keyed by backbone, size and the datasets' hashes).
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from probe_data import external_sets
from sklearn.metrics import balanced_accuracy_score as bacc

from automl_cxr.data import load_dataset
from automl_cxr.engine import group_balance_weights, make_site_splits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from selection_probe import CONFIGS, _features  # noqa: E402

METHODS = ("erm_source", "dro_source", "dro_site")
WD_GRID = (0.01, 0.1, 1.0, 3.0, 10.0, 30.0)
ETA = 0.05
"""Step size of the group weights (Sagawa et al. use 0.01-0.1)."""
STEPS = 400


def _cached_features(backbone: str, size: int, datasets: dict) -> dict[str, np.ndarray]:
    key = hashlib.sha256(
        json.dumps([backbone, size, {k: d.hash for k, d in sorted(datasets.items())}]).encode()
    ).hexdigest()[:16]
    path = Path.home() / ".cache" / "automl-cxr" / "probe-features" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    f = _features(backbone, size, datasets)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **f)
    return f


def fit(x, y, groups, method: str, wd: float, w=None):
    """A linear classifier on standardised `x`; returns predict(z) -> labels."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.01)
    names, gi = np.unique(groups, return_inverse=True)
    gi = torch.tensor(gi)
    q = torch.ones(len(names)) / len(names)
    wt = None if w is None else torch.tensor(w / w.mean(), dtype=torch.float32)
    for _ in range(STEPS):
        loss_i = torch.nn.functional.cross_entropy(lin(xt), yt, reduction="none")
        if method == "erm_source":
            loss = (loss_i * wt).mean()
        else:
            g_loss = torch.zeros(len(names)).scatter_add(0, gi, loss_i) / torch.bincount(
                gi, minlength=len(names)
            )
            q = q * torch.exp(ETA * g_loss.detach())
            q = q / q.sum()
            loss = (q * g_loss).sum()
        loss = loss + wd * lin.weight.pow(2).sum() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    lin.eval()

    def predict(z):
        with torch.no_grad():
            zt = torch.tensor((z - mu) / sd, dtype=torch.float32)
            return lin(zt).argmax(1).numpy()

    return predict


def _groups(method: str, y, source, site) -> np.ndarray:
    by = source if method in ("erm_source", "dro_source") else site
    return np.char.add(np.char.add(by.astype(str), "|"), y.astype(str))


def _train(x, y, source, site, method, wd):
    w = group_balance_weights(y, source) if method == "erm_source" else None
    return fit(x, y, _groups(method, y, source, site), method, wd, w)


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
        f = _cached_features(backbone, size, {"train": train, "cohen": cohen, "nih": nih})
        x = f["train"]
        for method in METHODS:
            for wd in WD_GRID:
                scores = []
                for s in folds:
                    tr = s.train
                    p = _train(x[tr], y[tr], source[tr], site[tr], method, wd)(x[s.val])
                    scores.append(bacc(y[s.val], p))
                g = _train(x, y, source, site, method, wd)
                row = {
                    "backbone": backbone,
                    "size": size,
                    "method": method,
                    "wd": wd,
                    "site_cv": float(np.mean(scores)),
                    "worst_fold": float(np.min(scores)),
                    "cohen_sites": float(bacc(yc, g(f["cohen"]))),
                    "nih_specificity": float(np.mean(g(f["nih"]) == 1)),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    (HERE / "dro_probe.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = [
        "Best penalty of each method by site CV (fold mean), and the mean over the penalties:",
        "",
        "| backbone | px | method | wd | site CV | worst fold | cohen_sites | nih spec. | "
        "mean cohen_sites over wd |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backbone, size in CONFIGS:
        for method in METHODS:
            sub = [r for r in rows if r["backbone"] == backbone and r["method"] == method]
            b = max(sub, key=lambda r: r["site_cv"])
            lines.append(
                f"| {backbone} | {size} | {method} | {b['wd']} | {b['site_cv']:.3f} | "
                f"{b['worst_fold']:.3f} | {b['cohen_sites']:.3f} | {b['nih_specificity']:.3f} | "
                f"{np.mean([r['cohen_sites'] for r in sub]):.3f} |"
            )
    (HERE / "dro_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
