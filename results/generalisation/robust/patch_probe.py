"""Lung patches instead of whole films (issue 23 §1, "anything else the literature supports").

The lever: Oh, Park & Ye (2020, IEEE TMI, "Deep learning COVID-19 features on CXR using limited
training data sets") classify random patches taken *inside the segmented lungs* at a higher
resolution than the whole film, and call a film by the patches' vote. A patch holds lung
texture and little of what identifies a collection (borders, text, collimation, the film's
layout), and a small set of films yields many patches. Here on frozen ImageNet features, as the
other probes beside this file:

- every film (binary_adult, the external sets) resized to 512 px, its lungs found by the
  project's segmenter (`data/generalisation/lungs/segmenter.pt`, on the 256 px canvas, mask
  scaled to 512); `K` patch centres drawn inside the mask (a seeded generator per film; the
  whole film when the segmenter finds no plausible lungs, counted);
- two patch sides: 1/4 of the film (128 px) and 1/2 (256 px), each resized to the backbone's
  probe size (Lite1 128, MobileNet v2 224, Lite2 260), average-pooled frozen features;
- `patch`: a class-balanced L2 logistic regression on the patches (each carries its film's
  label and 1/K of its film's weight), a film's probability the mean of its patches';
  `patch_mean`: the same on each film's mean patch feature; `whole`: the whole-film features
  of selection_probe.py (the comparison, same run);
- training films weighted as nothing or as the searched `source_balance`; 4 strengths (C).

Each configuration is scored by the search's 3 site folds (seed 0, mean of the folds' balanced
accuracies) and once on `cohen_sites` and new NIH patients. Nothing is chosen on the external
sets. Usage:
    python results/generalisation/robust/patch_probe.py [DATA_DIR]
Writes patch_probe.md and patch_probe.json beside this file.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from probe_data import external_sets
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score as bacc
from sklearn.preprocessing import StandardScaler

from automl_cxr.data import load_dataset
from automl_cxr.engine import make_site_splits
from automl_cxr.lungs import CANVAS, Preprocess, PreprocessSpec, load_segmenter
from automl_cxr.models import ModelConfig, build_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from selection_probe import CONFIGS, weights  # noqa: E402

FILM = 512
K = 10
SIDES = (128, 256)
WEIGHTINGS = ("none", "source")
C_GRID = (0.0003, 0.001, 0.01, 0.1)


def lung_masks(images: np.ndarray, seg_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(masks (N, FILM, FILM) bool, plausible (N,)) of (N, CANVAS, CANVAS) uint8 films."""
    seg = load_segmenter(seg_path)
    module = Preprocess(PreprocessSpec("lung_crop", "none", seg.key), 128, seg).eval()
    masks, oks = [], []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            x = torch.from_numpy(np.array(images[i : i + 32])).float()[:, None] / 255.0
            m, ok = module.lungs(x)
            masks.append(F.interpolate(m.float(), size=(FILM, FILM), mode="nearest")[:, 0] > 0.5)
            oks.append(ok)
    return torch.cat(masks).numpy(), torch.cat(oks).numpy()


def patch_boxes(masks: np.ndarray, ok: np.ndarray, side: int, seed: int) -> np.ndarray:
    """(N, K, 2) top-left corners of K patches per film, centred on lung pixels (anywhere on
    the film where the lungs were not found), kept inside the film."""
    half, out = side // 2, np.empty((len(masks), K, 2), dtype=int)
    for i, (m, good) in enumerate(zip(masks, ok, strict=True)):
        rng = np.random.default_rng([seed, i])
        ys, xs = np.nonzero(m) if good else (np.array([]), np.array([]))
        if len(ys):
            pick = rng.integers(0, len(ys), K)
            cy, cx = ys[pick], xs[pick]
        else:
            cy, cx = rng.integers(half, FILM - half, (2, K))
        out[i, :, 0] = np.clip(cy - half, 0, FILM - side)
        out[i, :, 1] = np.clip(cx - half, 0, FILM - side)
    return out


@torch.inference_mode()
def patch_features(model, films: np.ndarray, boxes: np.ndarray, side: int, size: int):
    """(N, K, D) average-pooled features of every film's patches, resized to `size`."""
    n, feats = len(films), []
    for i in range(0, n, 8):
        crops = [
            films[j, y : y + side, x : x + side]
            for j in range(i, min(i + 8, n))
            for y, x in boxes[j]
        ]
        t = torch.from_numpy(np.stack(crops)).float()[:, None] / 255.0
        if side != size:
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
        feats.append(model.forward_features(t).mean((2, 3)).numpy())
    f = np.concatenate(feats)
    return f.reshape(n, K, -1)


@torch.inference_mode()
def whole_features(model, films: np.ndarray, size: int) -> np.ndarray:
    out = []
    for i in range(0, len(films), 32):
        t = torch.from_numpy(np.array(films[i : i + 32])).float()[:, None] / 255.0
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
        out.append(model.forward_features(t).mean((2, 3)).numpy())
    return np.concatenate(out)


def fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float, per_patch: bool):
    """A film-level scorer: P(non-COVID) of films' features `(N, D)` or patches `(N, K, D)`."""
    if per_patch:
        x, y, w = x.reshape(-1, x.shape[-1]), np.repeat(y, K), np.repeat(w / K, K)
    keep = w > 0
    sc = StandardScaler().fit(x[keep])
    clf = LogisticRegression(C=c, max_iter=3000).fit(
        sc.transform(x[keep]), y[keep], sample_weight=w[keep]
    )

    def score(z: np.ndarray) -> np.ndarray:
        if per_patch:
            p = clf.predict_proba(sc.transform(z.reshape(-1, z.shape[-1])))[:, 1]
            return p.reshape(len(z), K).mean(1)
        return clf.predict_proba(sc.transform(z))[:, 1]

    return score


def evaluate(feats, y, source, site, folds, kind, c, per_patch, ext) -> dict:
    scores = []
    for s in folds:
        g = fit(
            feats["train"][s.train],
            y[s.train],
            weights(y[s.train], source[s.train], site[s.train], kind),
            c,
            per_patch,
        )
        scores.append(bacc(y[s.val], g(feats["train"][s.val]) > 0.5))
    g = fit(feats["train"], y, weights(y, source, site, kind), c, per_patch)
    return {
        "site_cv": float(np.mean(scores)),
        "folds": [float(v) for v in scores],
        "cohen_sites": float(bacc(ext["cohen"], g(feats["cohen"]) > 0.5)),
        "nih_specificity": float(np.mean(g(feats["nih"]) > 0.5)),
    }


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    data_dir = Path(argv[0]) if argv else Path("data/generalisation")
    train = load_dataset("binary_adult", data_dir)
    cohen, nih = external_sets(train, data_dir)
    assert train.classes == cohen.classes == ["covid", "non_covid"], train.classes
    y = np.asarray(train.labels)  # 1 = non-COVID
    site = train.manifest["site"].to_numpy().astype(str)
    source = train.manifest["source"].to_numpy().astype(str)
    patient = train.manifest["patient_id"].to_numpy().astype(str)
    folds = make_site_splits(y, patient, site, n_folds=3, seed=0)[0]
    sets = {"train": train, "cohen": cohen, "nih": nih}
    seg_path = data_dir / "lungs" / "segmenter.pt"
    films, masks, found = {}, {}, {}
    for key, ds in sets.items():
        films[key] = np.asarray(ds.images(FILM))
        masks[key], found[key] = lung_masks(ds.images(CANVAS), seg_path)
    fallbacks = {k: int((~v).sum()) for k, v in found.items()}
    print(f"lungs not found (whole film used): {fallbacks}", flush=True)
    labels = {"cohen": np.asarray(cohen.labels)}
    rows, timings = [], {}
    for backbone, size in CONFIGS:
        model = build_model(ModelConfig(backbone=backbone, num_classes=2, frozen_stages=0)).eval()
        t0 = time.perf_counter()
        variants = {("whole", 0): {k: whole_features(model, films[k], size) for k in sets}}
        for side in SIDES:
            feats = {
                k: patch_features(
                    model, films[k], patch_boxes(masks[k], found[k], side, seed=0), side, size
                )
                for k in sets
            }
            variants[("patch", side)] = feats
            variants[("patch_mean", side)] = {k: v.mean(1) for k, v in feats.items()}
        timings[f"{backbone}_{size}"] = round(time.perf_counter() - t0, 1)
        print(f"{backbone} {size}px features in {timings[f'{backbone}_{size}']} s", flush=True)
        for (kind_in, side), feats in variants.items():
            for kind in WEIGHTINGS:
                for c in C_GRID:
                    r = evaluate(feats, y, source, site, folds, kind, c, kind_in == "patch", labels)
                    rows.append(
                        {"backbone": backbone, "size": size, "input": kind_in, "side": side}
                        | {"weighting": kind, "C": c}
                        | r
                    )
    (HERE / "patch_probe.json").write_text(
        json.dumps(
            {"film_px": FILM, "patches": K, "fallbacks": fallbacks, "feature_seconds": timings}
            | {"configurations": rows},
            indent=2,
        )
        + "\n"
    )
    lines = [
        f"Films at {FILM} px, {K} lung patches per film; lungs not found (whole film used): "
        f"{fallbacks}. Best C of each by site CV (fold mean, seed 0):",
        "",
        "| backbone | px | input | patch side | weighting | C | site CV | folds | cohen_sites | "
        "nih spec. | mean cohen_sites over C |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["size"], r["input"], r["side"], r["weighting"]), [])
        groups[(r["backbone"], r["size"], r["input"], r["side"], r["weighting"])].append(r)
    for (backbone, size, kind_in, side, kind), sub in groups.items():
        b = max(sub, key=lambda r: r["site_cv"])
        lines.append(
            f"| {backbone} | {size} | {kind_in} | {side or '–'} | {kind} | {b['C']} | "
            f"{b['site_cv']:.3f} | {' / '.join(f'{v:.2f}' for v in b['folds'])} | "
            f"{b['cohen_sites']:.3f} | {b['nih_specificity']:.3f} | "
            f"{np.mean([r['cohen_sites'] for r in sub]):.3f} |"
        )
    lines += ["", "Paired over backbone x weighting x C (each patch variant against `whole`):", ""]
    lines += ["| input | side | Δ site CV | Δ cohen_sites | cohen_sites up in | Δ NIH spec. |"]
    lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
    base = {(r["backbone"], r["weighting"], r["C"]): r for r in rows if r["input"] == "whole"}
    for kind_in in ("patch", "patch_mean"):
        for side in SIDES:
            sub = [r for r in rows if r["input"] == kind_in and r["side"] == side]
            d = {
                k: np.array([r[k] - base[(r["backbone"], r["weighting"], r["C"])][k] for r in sub])
                for k in ("site_cv", "cohen_sites", "nih_specificity")
            }
            lines.append(
                f"| {kind_in} | {side} | {d['site_cv'].mean():+.3f} | "
                f"{d['cohen_sites'].mean():+.3f} | {(d['cohen_sites'] > 0).sum()} of {len(sub)} | "
                f"{d['nih_specificity'].mean():+.3f} |"
            )
    best = max(rows, key=lambda r: r["site_cv"])
    lines += [
        "",
        f"Best of all {len(rows)} by site CV: {best['backbone']} {best['size']} px, "
        f"{best['input']} {best['side'] or ''}, {best['weighting']}, C={best['C']}: site CV "
        f"{best['site_cv']:.3f}, cohen_sites {best['cohen_sites']:.3f}, NIH specificity "
        f"{best['nih_specificity']:.3f}. Feature seconds: {timings}.",
    ]
    (HERE / "patch_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
