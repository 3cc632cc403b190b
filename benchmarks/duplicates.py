"""The duplicate finder on the shared films: recall on re-framed copies, false pairs, cost.

    .venv/bin/python benchmarks/duplicates.py [--copies 500] [--out benchmarks/duplicates.json]

1. Recall: `--copies` re-framed copies (`automl_cxr.data.reframe`: crop, pad, aspect, rotation,
   resize, gamma/equalisation, JPEG, burned-in marks) of randomly drawn shared films, searched
   against all shared films (cohen/, kermany/, nih/): a copy is found when the finder pairs it
   with its original (as `copy` or `same_patient`); the copies are written to a temporary
   folder, so the aligned-texture step reads files as in `data prepare`. Recall without that
   step (keypoints only) is measured beside it.
2. False pairs: every pair the finder reports within nih/ (621 films, one per patient) and
   across the whole shared pool, with the source metadata's patient ids beside each pair.
3. Inlier distributions of verified pairs by kind (copies, films of one Cohen patient, random
   pairs of different patients): what the thresholds in `automl_cxr/data/_duplicates.py` rest on.
4. Cost: seconds per 1,000 images for features, shortlist + verification.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from automl_cxr.data import decode_gray, read_cohen, read_kermany, read_nih
from automl_cxr.data._aligned import ALIGNED_CORRELATION, RESCUE_INLIERS
from automl_cxr.data._duplicates import (
    COPY_INLIERS,
    MATCH_INLIERS,
    find_matches,
    verify_pair,
)
from automl_cxr.data._keypoints import extract_features
from automl_cxr.data._reframe import reframe
from automl_cxr.data._shortlist import shortlist
from automl_cxr.settings import default_sources_dir


def _pool(root: Path) -> pd.DataFrame:
    tables = [read_cohen(root / "cohen"), read_kermany(root / "kermany"), read_nih(root / "nih")]
    return pd.concat([t.table for t in tables], ignore_index=True)


def _stats(x: list[int]) -> dict:
    a = np.asarray(x, dtype=float)
    if not len(a):
        return {"n": 0}
    q = np.percentile(a, [2, 10, 50, 90, 99])
    return {
        "n": len(a),
        "min": float(a.min()),
        "p2": q[0],
        "p10": q[1],
        "median": q[2],
        "p90": q[3],
        "p99": q[4],
        "max": float(a.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_sources_dir())
    ap.add_argument("--copies", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("duplicates.json"))
    args = ap.parse_args()

    pool = _pool(args.data)
    t0 = time.perf_counter()
    imgs = [decode_gray(p).pixels for p in pool["path"]]
    t_decode = time.perf_counter() - t0
    print(f"{len(imgs)} shared films decoded in {t_decode:.1f} s")

    t0 = time.perf_counter()
    feats = extract_features(imgs)
    t_feat = time.perf_counter() - t0
    paths = pool["path"].astype(str).tolist()
    t0 = time.perf_counter()
    within = find_matches(feats, paths=paths)
    t_match = time.perf_counter() - t0
    print(f"features {t_feat:.1f} s, shortlist + verification {t_match:.1f} s")

    def describe(m):
        ra, rb = pool.iloc[m.a], pool.iloc[m.b]
        return {
            "a": Path(ra["path"]).name,
            "b": Path(rb["path"]).name,
            "sources": [ra["source"], rb["source"]],
            "patients": [str(ra["patient_id"]), str(rb["patient_id"])],
            "same_patient_id": str(ra["patient_id"]) == str(rb["patient_id"]),
            **m.evidence(),
        }

    pairs = [describe(m) for m in within]
    nih_pairs = [p for p in pairs if p["sources"] == ["nih", "nih"]]
    other_patient = [p for p in pairs if not p["same_patient_id"]]
    print(
        f"pairs in the pool: {len(pairs)} ({len(nih_pairs)} within nih/, "
        f"{len(other_patient)} between different patient ids)"
    )

    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(imgs), args.copies, replace=False)
    copies, edits, cpaths = [], [], []
    tmp = tempfile.TemporaryDirectory(prefix="automl-cxr-copies-")
    for k, i in enumerate(idx):
        r = reframe(imgs[i], rng)
        copies.append(r.pixels)
        edits.append(r.edits)
        cpaths.append(str(Path(tmp.name) / f"copy{k:04d}{r.suffix}"))
        Path(cpaths[-1]).write_bytes(r.data)  # step 4 of the finder reads the files
    t0 = time.perf_counter()
    cfeats = extract_features(copies)
    t_cfeat = time.perf_counter() - t0
    t0 = time.perf_counter()
    cm_keypoints = find_matches(cfeats, feats)  # steps 1-3 only (no files given)
    t_keypoints = time.perf_counter() - t0
    t0 = time.perf_counter()
    cm = find_matches(cfeats, feats, paths=cpaths, base_paths=paths)
    t_cmatch = time.perf_counter() - t0
    tmp.cleanup()
    hit_keypoints = {(m.a, m.b) for m in cm_keypoints}
    found_keypoints = float(np.mean([(k, int(i)) in hit_keypoints for k, i in enumerate(idx)]))
    short = shortlist(cfeats, feats)
    shortlisted = float(np.mean([(k, int(i)) in short for k, i in enumerate(idx)]))
    print(
        f"original in the shortlist: {shortlisted:.3f}; candidates per copy "
        f"{len(short) / args.copies:.1f}"
    )
    hit = {(m.a, m.b): m for m in cm}
    found = [(k, int(i)) in hit for k, i in enumerate(idx)]
    as_copy = [
        hit[(k, int(i))].kind == "copy" if (k, int(i)) in hit else False for k, i in enumerate(idx)
    ]
    recall = float(np.mean(found))
    by_texture = float(
        np.mean(
            [
                (k, int(i)) in hit and hit[(k, int(i))].correlation is not None
                for k, i in enumerate(idx)
            ]
        )
    )
    print(
        f"recall on {args.copies} re-framed copies: {recall:.3f} (as copy {np.mean(as_copy):.3f}, "
        f"by aligned texture {by_texture:.3f}; keypoints only {found_keypoints:.3f})"
    )
    missed = [
        {"original": Path(pool["path"].iloc[i]).name, "edits": edits[k]}
        for k, i in enumerate(idx)
        if not found[k]
    ]

    # Inlier distributions (direct verification, no shortlist).
    copy_inl = [verify_pair(cfeats.image(k), feats.image(int(i)))[0] for k, i in enumerate(idx)]
    votes = [short.get((k, int(i)), 0) for k, i in enumerate(idx)]
    cohen = pool.index[pool["source"] == "cohen"]
    same_pt = []
    for _, g in pool.loc[cohen].groupby("patient_id"):
        same_pt += list(itertools.combinations(g.index.tolist(), 2))
    follow = [verify_pair(feats.image(a), feats.image(b))[0] for a, b in same_pt]
    pid = pool["patient_id"].astype(str).to_numpy()
    rnd = []
    while len(rnd) < 3000:
        a, b = rng.choice(len(imgs), 2, replace=False)
        if pid[a] != pid[b] and pool["source"].iloc[a] == pool["source"].iloc[b]:
            rnd.append(verify_pair(feats.image(int(a)), feats.image(int(b)))[0])

    n_all = len(imgs) + args.copies
    result = {
        "command": "python benchmarks/duplicates.py "
        + " ".join(f"--{k} {v}" for k, v in (("copies", args.copies), ("seed", args.seed))),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "thresholds": {
            "MATCH_INLIERS": MATCH_INLIERS,
            "COPY_INLIERS": COPY_INLIERS,
            "RESCUE_INLIERS": RESCUE_INLIERS,
            "ALIGNED_CORRELATION": ALIGNED_CORRELATION,
        },
        "recall": {
            "copies": args.copies,
            "found": recall,
            "shortlisted": shortlisted,
            "found_as_copy": float(np.mean(as_copy)),
            "found_by_aligned_texture": by_texture,
            "found_keypoints_only": found_keypoints,
            "missed": missed,
        },
        "pool": {
            "images": len(imgs),
            "pairs": len(pairs),
            "nih_pairs": nih_pairs,
            "pairs_between_patient_ids": other_patient,
            "pairs_same_patient_id": len(pairs) - len(other_patient),
        },
        "votes_of_copies": _stats(votes),
        "inliers": {
            "reframed_copies": _stats(copy_inl),
            "cohen_same_patient_pairs": _stats(follow),
            "random_different_patient_pairs": _stats(rnd),
        },
        "seconds_per_1000_images": {
            "decode": round(t_decode / len(imgs) * 1000, 2),
            "features": round((t_feat + t_cfeat) / n_all * 1000, 2),
            "shortlist_and_verification": round((t_match + t_cmatch) / n_all * 1000, 2),
            "copies_keypoints_only_per_1000_copies": round(t_keypoints / args.copies * 1000, 2),
            "copies_with_aligned_texture_per_1000_copies": round(t_cmatch / args.copies * 1000, 2),
        },
    }
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("inliers", "seconds_per_1000_images")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
