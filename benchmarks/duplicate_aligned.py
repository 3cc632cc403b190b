"""What the aligned-texture step of the duplicate finder rests on (issue 28).

Of the pairs the shortlist proposes, some fail keypoint verification (fewer than
`MATCH_INLIERS` inliers over `MIN_CELLS` cells): heavily cropped or equalised copies, and films
of two patients. This script takes every such pair that still has a plausible transform with
`RESCUE_INLIERS` inliers, warps one image onto the other by it and measures how well they agree
(`aligned_correlation`, and the alternatives it was chosen over): whole-image correlation of the
equalised intensities, and the median cell correlation of band-passed images for three bands.

Pairs: the re-framed copies of `duplicates.py` (same films, `--seed`) against their originals,
and every shortlisted pair of the 2,939 shared films, split by whether they are one patient: the
same id in the source metadata, or ids that keypoint verification already joins (the pool's
copies across Cohen patient ids). A measure that separates the failed copies from the failed pairs
of two patient ids can confirm the former without accepting the latter.

    .venv/bin/python benchmarks/duplicate_aligned.py [--seed 0]   # writes duplicate_aligned.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from automl_cxr.data import decode_gray
from automl_cxr.data._aligned import (
    ALIGNED_CORRELATION,
    ALIGNED_SIGMAS,
    RESCUE_INLIERS,
    align,
    aligned_correlation,
)
from automl_cxr.data._duplicates import (
    MATCH_INLIERS,
    _fit,
    _passes,
    find_matches,
    mutual_matches,
)
from automl_cxr.data._keypoints import extract_features, work_image
from automl_cxr.data._reframe import reframe
from automl_cxr.data._scan import UnionFind
from automl_cxr.data._shortlist import shortlist
from automl_cxr.settings import default_sources_dir

try:  # run as a script from the repo root or from benchmarks/
    from duplicates import _pool
except ImportError:  # pragma: no cover
    from benchmarks.duplicates import _pool

BANDS = ((0.5, 2.0), (1.0, 4.0), (2.0, 8.0))


def _whole(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float | None:
    """Correlation of the equalised intensities over the whole overlap (the failed alternative:
    films lined up by a burned-in label correlate as well as copies)."""
    warped, ok = align(a, b, m)
    if ok.mean() < 0.1:
        return None
    x, y = a[ok].astype(np.float64), warped[ok].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / den) if den > 0 else None


def _measure(fa, fb, ia, ib) -> dict | None:
    """The keypoint verdict and, for a pair that fails it with a plausible transform of
    `RESCUE_INLIERS` inliers, every measure."""
    mm = mutual_matches(fa[1], fb[1]) if min(len(fa[1]), len(fb[1])) >= 4 else None
    if _passes(_fit(fa, fb, MATCH_INLIERS, mm)):
        return {"passes_keypoints": True}
    fit = _fit(fa, fb, RESCUE_INLIERS, mm)
    if fit is None or len(fit[0]) < RESCUE_INLIERS:
        return None
    out: dict = {"passes_keypoints": False, "inliers": len(fit[0]), "cells": fit[3]["cells"]}
    out["whole"] = _whole(ia, ib, fit[2])
    for lo, hi in BANDS:
        out[f"cells_dog_{lo:g}_{hi:g}"] = aligned_correlation(ia, ib, fit[2], sigmas=(lo, hi))
    return out


def _summary(rows: list[dict | None], key: str) -> dict:
    vals = [r[key] for r in rows if r and not r["passes_keypoints"] and r[key] is not None]
    if not vals:
        return {"n": 0}
    a = np.sort(np.asarray(vals))
    return {
        "n": len(a),
        "min": round(float(a[0]), 3),
        "median": round(float(np.median(a)), 3),
        "max": round(float(a[-1]), 3),
        "at_or_above_threshold": int((a >= ALIGNED_CORRELATION).sum()),
        "top5": [round(float(v), 3) for v in a[-5:]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_sources_dir())
    ap.add_argument("--copies", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("duplicate_aligned.json"))
    args = ap.parse_args()
    pool = _pool(args.data)
    imgs = [decode_gray(p).pixels for p in pool["path"]]
    feats = extract_features(imgs)
    rng = np.random.default_rng(args.seed)  # the copies of duplicates.py
    idx = rng.choice(len(imgs), args.copies, replace=False)
    copies = [reframe(imgs[i], rng).pixels for i in idx]
    cfeats = extract_features(copies)
    work = [work_image(p) for p in imgs]
    cwork = [work_image(p) for p in copies]
    # one patient: the same id in the source metadata, or ids the keypoints already join (the
    # pool's copies across Cohen patient ids, e.g. 30 = 31 and 137 = 202 in DUPLICATES.md)
    ids = pool["patient_id"].astype(str).to_numpy()
    joined = UnionFind(set(ids))
    for m in find_matches(feats):
        joined.join(ids[m.a], ids[m.b])
    pid = np.array([joined.find(i) for i in ids])
    groups: dict[str, list] = {"copy_vs_original": [], "two_patient_ids": [], "one_patient_id": []}
    t0 = time.perf_counter()
    for k, i in shortlist(cfeats, feats):
        if i == idx[k]:
            groups["copy_vs_original"].append(
                _measure(cfeats.image(k), feats.image(i), cwork[k], work[i])
            )
        else:  # a copy against another film: two patients unless the metadata says otherwise
            key = "one_patient_id" if pid[i] == pid[idx[k]] else "two_patient_ids"
            groups[key].append(_measure(cfeats.image(k), feats.image(i), cwork[k], work[i]))
    for a, b in shortlist(feats):
        key = "one_patient_id" if pid[a] == pid[b] else "two_patient_ids"
        groups[key].append(_measure(feats.image(a), feats.image(b), work[a], work[b]))
    seconds = time.perf_counter() - t0
    keys = ["whole"] + [f"cells_dog_{lo:g}_{hi:g}" for lo, hi in BANDS]
    result = {
        "command": f"python benchmarks/duplicate_aligned.py --seed {args.seed}",
        "rule": {
            "RESCUE_INLIERS": RESCUE_INLIERS,
            "ALIGNED_SIGMAS": list(ALIGNED_SIGMAS),
            "ALIGNED_CORRELATION": ALIGNED_CORRELATION,
        },
        "shortlisted_pairs": {k: len(v) for k, v in groups.items()},
        "failing_keypoints_with_a_transform": {
            k: sum(1 for r in v if r and not r["passes_keypoints"]) for k, v in groups.items()
        },
        "measures": {m: {g: _summary(v, m) for g, v in groups.items()} for m in keys},
        "seconds": round(seconds, 1),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for m in keys:
        print(m)
        for g in groups:
            print(f"  {g:18s} {result['measures'][m][g]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
