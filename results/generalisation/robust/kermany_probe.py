"""Features learnt where the label is not the hospital: a Kermany intermediate fine-tune.

(2026-12-07). Every lever so far acted on how a classifier *uses* frozen ImageNet features;
none changed the features, and the held-out-hospital AUC of every site-CV trial stays at 0.54-0.75
(``auc_bound.py``): the representation is what is missing. The shared data holds one set whose
labels are not tied to a hospital: Kermany's pediatric films (normal, bacterial and viral
pneumonia) all come from one hospital, so a backbone fine-tuned to tell them apart can only
learn what differs between the diseases, not between collections. Intermediate fine-tuning on
such a related task before the target task is a standard transfer recipe (Pruksachatkun et al.
2020 "intermediate-task transfer"; for chest films, e.g. pneumonia pre-training before COVID-19,
Apostolopoulos & Mpesiana's own follow-ups).

For each offline backbone: fine-tune every stage on Kermany's three classes (BatchNorm
statistics kept at ImageNet's, so adult films are normalised as before), 85 % of the films for
training and 15 % to report that it learnt the task; then the same probe as
``selection_probe.py`` on ``binary_adult`` with (a) the ImageNet features, (b) the fine-tuned
backbone's pooled features, (c) only its three Kermany logits ("how normal / bacterial / viral
does this adult film look"): class-balanced L2 logistic regressions, no weighting or the
searched ``source_balance``, 4 regularisation strengths, each configuration's figure for the
search's 3 site folds (seed 0, fold mean) and once on the external sets (balanced accuracy and,
threshold-free, AUC on ``cohen_sites``). Nothing is chosen on the external sets. No Kermany film
is in any evaluation set; the adult films are never used for the fine-tune.

    python results/generalisation/robust/kermany_probe.py [DATA_DIR]

Writes kermany_probe.md and kermany_probe.json beside this file.
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
from sklearn.metrics import balanced_accuracy_score as bacc
from sklearn.metrics import roc_auc_score

from automl_cxr.data import load_dataset
from automl_cxr.engine import make_site_splits
from automl_cxr.models import ModelConfig, build_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adapt_probe import _batches  # noqa: E402
from dro_probe import _cached_features  # noqa: E402
from selection_probe import C_GRID, CONFIGS, weights  # noqa: E402

KERMANY_CLASSES = ("normal", "bacterial", "viral")
EPOCHS = 5
LR = 3e-4
BATCH = 32


def kermany_films(data_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every Kermany film of the prepared recipes (deduplicated by content) and its class."""
    imgs, labels, seen = [], [], set()
    for recipe in ("four_class", "three_class"):
        ds = load_dataset(recipe, data_dir)
        arr = ds.images(size)
        m = ds.manifest.reset_index(drop=True)
        for i, row in m.iterrows():
            if row["source"] != "kermany" or row["sha256"] in seen:
                continue
            seen.add(row["sha256"])
            imgs.append(np.asarray(arr[i]))
            labels.append(KERMANY_CLASSES.index(str(row["finding"]).split("/")[-1]))
    return np.stack(imgs), np.asarray(labels)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random crop of 85-100 % of each side, resized back, and a gamma of 0.8-1.25."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        s = 0.85 + 0.15 * torch.rand(2, generator=gen)
        ch, cw = int(h * s[0]), int(w * s[1])
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = x[i : i + 1, :, y0 : y0 + ch, x0 : x0 + cw]
        out[i] = torch.nn.functional.interpolate(crop, (h, w), mode="bilinear")[0]
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.45)
    return out.clamp(0, 1) ** gamma


def fine_tune(backbone: str, size: int, imgs: np.ndarray, y: np.ndarray, log) -> tuple:
    """The backbone fine-tuned on Kermany's classes; (model, held-out balanced accuracy)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    n_val = len(y) * 15 // 100
    val, tr = order[:n_val], order[n_val:]
    model = build_model(ModelConfig(backbone=backbone, num_classes=3, frozen_stages=0))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    steps = EPOCHS * -(-len(tr) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    cw = torch.tensor(len(tr) / (3 * np.bincount(y[tr], minlength=3)), dtype=torch.float32)
    for epoch in range(EPOCHS):
        model.train()
        for m in model.modules():  # keep ImageNet's BatchNorm statistics for the adult films
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        perm = rng.permutation(tr)
        t0, total = time.time(), 0.0
        for i in range(0, len(perm), BATCH):
            idx = np.sort(perm[i : i + BATCH])
            x = torch.from_numpy(imgs[idx]).float()[:, None] / 255.0
            loss = torch.nn.functional.cross_entropy(
                model(_augment(x, gen)), torch.from_numpy(y[idx]), weight=cw
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        model.eval()
        with torch.no_grad():
            pred = np.concatenate([model(x).argmax(1).numpy() for x in _batches(imgs, val)])
        acc = float(bacc(y[val], pred))
        log(
            f"  {backbone} {size}px epoch {epoch + 1}: loss {total / len(tr):.3f}, "
            f"held-out Kermany balanced acc {acc:.3f} ({time.time() - t0:.0f} s)"
        )
    return model, acc


@torch.no_grad()
def tuned_features(model, datasets: dict, size: int) -> dict[str, np.ndarray]:
    """Pooled features and Kermany logits of the fine-tuned model, per dataset."""
    model.eval()
    out = {}
    for key, ds in datasets.items():
        imgs = ds.images(size)
        idx = np.arange(len(imgs))
        feats, logits = [], []
        for x in _batches(imgs, idx):
            f = model.forward_features(x)
            feats.append(f.mean((2, 3)).numpy())
            logits.append(model.head(model.neck(f)).numpy())
        out[key] = np.concatenate(feats)
        out[key + "_logits"] = np.concatenate(logits)
    return out


def _fit(x, y, w, c):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=5000).fit(sc.transform(x), y, sample_weight=w)
    return lambda z: clf.predict_proba(sc.transform(z))[:, 1]


def probe(x, xc, xn, y, yc, source, site, folds, weighting, c) -> dict:
    scores = []
    for s in folds:
        w = weights(y[s.train], source[s.train], site[s.train], weighting)
        p = _fit(x[s.train], y[s.train], w, c)(x[s.val])
        scores.append(bacc(y[s.val], p > 0.5))
    g = _fit(x, y, weights(y, source, site, weighting), c)
    pc = g(xc)
    return {
        "site_cv": float(np.mean(scores)),
        "worst_fold": float(np.min(scores)),
        "cohen_sites": float(bacc(yc, pc > 0.5)),
        "cohen_sites_auc": float(roc_auc_score(yc, pc)),
        "nih_specificity": float(np.mean(g(xn) > 0.5)),
    }


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
    datasets = {"train": train, "cohen": cohen, "nih": nih}
    rows, tuned = [], {}
    for backbone, size in CONFIGS:
        t0 = time.time()
        kimgs, ky = kermany_films(data_dir, size)
        print(
            f"{backbone} {size}px: fine-tuning on {len(ky)} Kermany films "
            f"{np.bincount(ky).tolist()}",
            flush=True,
        )
        model, kacc = fine_tune(backbone, size, kimgs, ky, lambda s: print(s, flush=True))
        tuned[f"{backbone}-{size}"] = {"kermany_val_bacc": kacc, "seconds": time.time() - t0}
        base = _cached_features(backbone, size, datasets)
        ft = tuned_features(model, datasets, size)
        variants = {
            "imagenet": (base["train"], base["cohen"], base["nih"]),
            "kermany_tuned": (ft["train"], ft["cohen"], ft["nih"]),
            "kermany_logits": (ft["train_logits"], ft["cohen_logits"], ft["nih_logits"]),
        }
        for name, (x, xc, xn) in variants.items():
            for weighting in ("none", "source"):
                for c in C_GRID:
                    r = probe(x, xc, xn, y, yc, source, site, folds, weighting, c)
                    row = {
                        "backbone": backbone,
                        "size": size,
                        "features": name,
                        "weighting": weighting,
                        "C": c,
                        **r,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    (HERE / "kermany_probe.json").write_text(
        json.dumps({"fine_tune": tuned, "epochs": EPOCHS, "lr": LR, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "Fine-tune on Kermany (3 classes, every stage, "
        f"{EPOCHS} epochs): held-out Kermany balanced accuracy "
        + ", ".join(
            f"{k} {v['kermany_val_bacc']:.3f} ({v['seconds'] / 60:.1f} min)"
            for k, v in tuned.items()
        ),
        "",
        "Best C of each (features, weighting) by site CV (fold mean), and means over the 4 C:",
        "",
        "| backbone | px | features | weighting | C | site CV | worst fold | cohen_sites | "
        "cohen_sites AUC | nih spec. | mean cohen_sites | mean AUC |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backbone, size in CONFIGS:
        for name in ("imagenet", "kermany_tuned", "kermany_logits"):
            for weighting in ("none", "source"):
                sub = [
                    r
                    for r in rows
                    if r["backbone"] == backbone
                    and r["features"] == name
                    and r["weighting"] == weighting
                ]
                b = max(sub, key=lambda r: r["site_cv"])
                lines.append(
                    f"| {backbone} | {size} | {name} | {weighting} | {b['C']} | "
                    f"{b['site_cv']:.3f} | {b['worst_fold']:.3f} | {b['cohen_sites']:.3f} | "
                    f"{b['cohen_sites_auc']:.3f} | {b['nih_specificity']:.3f} | "
                    f"{np.mean([r['cohen_sites'] for r in sub]):.3f} | "
                    f"{np.mean([r['cohen_sites_auc'] for r in sub]):.3f} |"
                )
    (HERE / "kermany_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
