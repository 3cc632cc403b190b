"""Stronger photometric augmentation (issue 23 §1, "anything else"), on frozen pooled features.

The lever: every training image also trains as `PER_IMAGE` photometrically distorted versions
(gamma, contrast and brightness, blur or sharpening, noise, JPEG re-compression, sometimes
histogram equalisation), so what differs between a figure-quality Cohen image and a hospital
export in exposure, processing and compression is worth less to the classifier. In the search
the cpu profile caches frozen features of un-augmented images, so this lever would cost the
speed the search relies on; this probe asks first whether it moves the held-out hospitals.

Two strengths (`mild`, `strong`, below) against none; the same class-balanced L2 logistic
regressions on average-pooled features of the three offline backbones as mix_probe.py
(selection_probe.py's extractor), training images weighted as nothing or as the searched
`source_balance` (a distorted copy carries its image's weight), 4 regularisation strengths.
Validation folds and external sets are never distorted. Each configuration is scored by the
search's 3 site folds (seed 0, fold mean) and once on `cohen_sites` and new NIH patients.
Nothing is chosen on the external sets. Usage:
    python results/generalisation/robust/photometric_probe.py [DATA_DIR]
Writes photometric_probe.md and photometric_probe.json beside this file.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from probe_data import external_sets
from sklearn.metrics import balanced_accuracy_score as bacc

from automl_cxr.data import load_dataset
from automl_cxr.engine import make_site_splits
from automl_cxr.models import ModelConfig, build_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adapt_probe import _pooled  # noqa: E402
from selection_probe import CONFIGS, _features, _fit, weights  # noqa: E402

PER_IMAGE = 2
WEIGHTINGS = ("none", "source")
C_GRID = (0.0003, 0.001, 0.01, 0.1)
STRENGTHS = {
    # gamma range, contrast range, brightness shift, P(blur or sharpen), P(noise), noise sigma,
    # P(JPEG), JPEG quality range, P(histogram equalisation)
    "mild": ((0.75, 1.33), (0.8, 1.25), 0.08, 0.3, 0.3, 0.02, 0.3, (50, 90), 0.1),
    "strong": ((0.5, 2.0), (0.6, 1.5), 0.15, 0.6, 0.5, 0.05, 0.6, (15, 60), 0.25),
}


def distort(img: np.ndarray, strength: str, rng: np.random.Generator) -> np.ndarray:
    """One photometric distortion of a uint8 grey image (its geometry unchanged)."""
    gam, con, shift, p_blur, p_noise, sigma, p_jpeg, quality, p_eq = STRENGTHS[strength]
    x = img.astype(np.float32) / 255.0
    x = x ** np.exp(rng.uniform(np.log(gam[0]), np.log(gam[1])))
    m = float(x.mean())
    x = (x - m) * np.exp(rng.uniform(np.log(con[0]), np.log(con[1]))) + m
    x = x + rng.uniform(-shift, shift)
    if rng.random() < p_blur:
        s = rng.uniform(0.5, 1.5)
        blurred = cv2.GaussianBlur(x, (0, 0), s)
        x = blurred if rng.random() < 0.5 else x + rng.uniform(0.5, 1.5) * (x - blurred)
    if rng.random() < p_noise:
        x = x + rng.normal(0.0, rng.uniform(0.2, 1.0) * sigma, x.shape).astype(np.float32)
    out = (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)
    if rng.random() < p_eq:
        out = cv2.equalizeHist(out)
    if rng.random() < p_jpeg:
        q = int(rng.integers(quality[0], quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
        out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else out
    return out


def with_copies(x, y, extra, owner, rows, w):
    """Training features `x[rows]` (labels, weights `w`) plus the distorted copies `extra`
    of those images (`owner`: the image of each copy), each with its image's weight."""
    if extra is None:
        return x[rows], y[rows], w
    sel = np.flatnonzero(np.isin(owner, rows))
    pos = {r: i for i, r in enumerate(rows)}
    wa = w[[pos[o] for o in owner[sel]]]
    return (
        np.concatenate([x[rows], extra[sel]]),
        np.concatenate([y[rows], y[owner[sel]]]),
        np.concatenate([w, wa]),
    )


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
        model = build_model(ModelConfig(backbone=backbone, num_classes=2, frozen_stages=0)).eval()
        imgs = np.asarray(train.images(size))
        aug = {"none": None}
        for strength in STRENGTHS:
            rng = np.random.default_rng(0)
            copies = np.stack([distort(im, strength, rng) for im in imgs for _ in range(PER_IMAGE)])
            aug[strength] = _pooled(model, copies, np.arange(len(copies)))
        print(f"{backbone} {size}px features", flush=True)
        x = f["train"]
        owner = np.repeat(np.arange(len(y)), PER_IMAGE)  # row of aug[...] -> its image

        for kind in WEIGHTINGS:
            for strength in aug:
                for c in C_GRID:
                    scores = []
                    for s in folds:
                        w = weights(y[s.train], source[s.train], site[s.train], kind)
                        xa, ya, wa = with_copies(x, y, aug[strength], owner, s.train, w)
                        scores.append(bacc(y[s.val], _fit(xa, ya, wa, c)(x[s.val])))
                    w = weights(y, source, site, kind)
                    xa, ya, wa = with_copies(x, y, aug[strength], owner, np.arange(len(y)), w)
                    g = _fit(xa, ya, wa, c)
                    rows.append(
                        {
                            "backbone": backbone,
                            "size": size,
                            "weighting": kind,
                            "strength": strength,
                            "C": c,
                            "site_cv": float(np.mean(scores)),
                            "cohen_sites": float(bacc(yc, g(f["cohen"]))),
                            "nih_specificity": float(np.mean(g(f["nih"]) == 1)),
                        }
                    )
    (HERE / "photometric_probe.json").write_text(
        json.dumps({"strengths": STRENGTHS, "configurations": rows}, indent=2) + "\n"
    )
    lines = [
        "Best C of each by site CV (the search's estimate); mean over the 4 C values beside it:",
        "",
        "| backbone | px | weighting | augmentation | C | site CV | cohen_sites | nih spec. | "
        "mean site CV over C | mean cohen_sites over C |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    levels = ("none", *STRENGTHS)
    for backbone, size in CONFIGS:
        for kind in WEIGHTINGS:
            for strength in levels:
                sub = [
                    r
                    for r in rows
                    if (r["backbone"], r["size"], r["weighting"], r["strength"])
                    == (backbone, size, kind, strength)
                ]
                b = max(sub, key=lambda r: r["site_cv"])
                lines.append(
                    f"| {backbone} | {size} | {kind} | {strength} | {b['C']} | "
                    f"{b['site_cv']:.3f} | {b['cohen_sites']:.3f} | {b['nih_specificity']:.3f} | "
                    f"{np.mean([r['site_cv'] for r in sub]):.3f} | "
                    f"{np.mean([r['cohen_sites'] for r in sub]):.3f} |"
                )
    lines += ["", "Augmentation on vs off, paired over backbone x weighting x C (24 pairs each):"]
    lines += ["", "| strength | Δ site CV (mean) | Δ cohen_sites (mean) | cohen_sites up in | "]
    lines[-1] += "Δ nih spec. |"
    lines += ["| --- | ---: | ---: | ---: | ---: |"]
    off = {(r["backbone"], r["weighting"], r["C"]): r for r in rows if r["strength"] == "none"}
    for strength in STRENGTHS:
        d = [
            (r, off[(r["backbone"], r["weighting"], r["C"])])
            for r in rows
            if r["strength"] == strength
        ]
        dc = [a["cohen_sites"] - b["cohen_sites"] for a, b in d]
        lines.append(
            f"| {strength} | {np.mean([a['site_cv'] - b['site_cv'] for a, b in d]):+.3f} | "
            f"{np.mean(dc):+.3f} | {sum(v > 0 for v in dc)} of {len(dc)} | "
            f"{np.mean([a['nih_specificity'] - b['nih_specificity'] for a, b in d]):+.3f} |"
        )
    (HERE / "photometric_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
