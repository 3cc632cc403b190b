"""Would guided re-matching lift the duplicate finder's recall? (issue 28, measured, not taken)

The finder misses a re-framed copy in two ways: the original is not shortlisted, or the
shortlisted pair verifies with fewer than `MATCH_INLIERS` inliers (heavy crops, equalisation).
Guided matching is the textbook second pass for the latter: fit the affine on the first-pass
matches, project every keypoint of one image into the other, pair each with the closest
descriptor (Hamming ≤ `--hamming`) within `--radius` of where it lands, and fit RANSAC again.

This script measures it on what the finder sees: the same 2,939 shared films and 500 re-framed
copies as `duplicates.py` (same seed), every pair the shortlist proposes; for each (radius,
Hamming) it prints the second-pass inliers of the copies that failed the first pass, and the
largest second-pass inliers of shortlisted pairs of two different patients that also failed it
(the pairs a second pass must keep out).

    .venv/bin/python benchmarks/duplicate_guided.py      # writes benchmarks/duplicate_guided.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from automl_cxr.data import decode_gray
from automl_cxr.data._duplicates import (
    MATCH_INLIERS,
    RANSAC_CONFIDENCE,
    RANSAC_MAX_ITERS,
    RANSAC_THRESHOLD,
    mutual_matches,
)
from automl_cxr.data._keypoints import extract_features
from automl_cxr.data._reframe import reframe
from automl_cxr.data._shortlist import shortlist
from automl_cxr.settings import default_sources_dir

try:  # run as a script from the repo root or from benchmarks/
    from duplicates import _pool
except ImportError:  # pragma: no cover
    from benchmarks.duplicates import _pool

VARIANTS = ((0.006, 48), (0.01, 32), (0.01, 48), (0.02, 40), (0.02, 64))


def _fit(pa: np.ndarray, pb: np.ndarray):
    import cv2

    m, inl = cv2.estimateAffine2D(
        pa,
        pb,
        method=cv2.RANSAC,
        ransacReprojThreshold=RANSAC_THRESHOLD,
        maxIters=RANSAC_MAX_ITERS,
        confidence=RANSAC_CONFIDENCE,
    )
    return (None, 0) if m is None else (m, int(inl.sum()))


def _signs(d: np.ndarray) -> np.ndarray:
    return np.unpackbits(d, axis=1).astype(np.float32) * 2 - 1


def two_pass(a, b, radius: float, hamming: int) -> tuple[int, int]:
    """(first-pass inliers, guided second-pass inliers) of two images' (points, descriptors)."""
    (pa, da), (pb, db) = a, b
    q, t = mutual_matches(da, db)
    if len(q) < 4:
        return 0, 0
    m, n1 = _fit(pa[q], pb[t])
    if m is None or n1 < 8:
        return n1, 0
    land = pa @ m[:, :2].T + m[:, 2]
    near = ((land[:, None, :] - pb[None, :, :]) ** 2).sum(-1) <= radius**2
    ham = (da.shape[1] * 8 - _signs(da) @ _signs(db).T) / 2
    cost = np.where(near, ham, np.inf)
    j = cost.argmin(1)
    ok = (cost[np.arange(len(j)), j] <= hamming) & (cost.argmin(0)[j] == np.arange(len(j)))
    if ok.sum() < 4:
        return n1, 0
    return n1, _fit(pa[ok], pb[j[ok]])[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_sources_dir())
    ap.add_argument("--copies", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("duplicate_guided.json"))
    args = ap.parse_args()
    pool = _pool(args.data)
    imgs = [decode_gray(p).pixels for p in pool["path"]]
    feats = extract_features(imgs)
    rng = np.random.default_rng(args.seed)  # the copies of duplicates.py
    idx = rng.choice(len(imgs), args.copies, replace=False)
    cfeats = extract_features([reframe(imgs[i], rng).pixels for i in idx])
    pid = pool["patient_id"].astype(str).to_numpy()
    copies = [(k, i) for (k, i) in shortlist(cfeats, feats) if i == idx[k]]
    others = [(a, b) for (a, b) in shortlist(feats) if pid[a] != pid[b]]
    print(f"{len(copies)} shortlisted copies, {len(others)} shortlisted pairs of two patient ids")
    rows = []
    for radius, hamming in VARIANTS:
        t0 = time.perf_counter()
        pos = [two_pass(cfeats.image(k), feats.image(i), radius, hamming) for k, i in copies]
        neg = [two_pass(feats.image(a), feats.image(b), radius, hamming) for a, b in others]
        ms = (time.perf_counter() - t0) / (len(pos) + len(neg)) * 1000
        grey_pos = sorted(n2 for n1, n2 in pos if n1 < MATCH_INLIERS)
        grey_neg = sorted(n2 for n1, n2 in neg if n1 < MATCH_INLIERS)
        row = {
            "radius": radius,
            "hamming": hamming,
            "failed_copies_second_pass": grey_pos,
            "failed_other_patients_second_pass_top10": grey_neg[-10:],
            "ms_per_pair": round(ms, 2),
        }
        rows.append(row)
        print(row, flush=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/duplicate_guided.py",
                "copies_shortlisted": len(copies),
                "other_patient_pairs_shortlisted": len(others),
                "variants": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
