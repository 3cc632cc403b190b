"""Verification cost of the duplicate finder, side by side in one run (issue 28):

    python benchmarks/duplicate_verification.py [--nih 300] [--cohen 300] [--repeats 2]
        [--out benchmarks/duplicate_verification.json]

The shortlist's candidate pairs of N NIH + M Cohen films are verified
- with OpenCV's BFMatcher (k=2 forward, 1 back; the matcher before 2026-12-06) and with
  `mutual_matches` (faiss binary brute force each way): time per pair, and whether the two give
  the same match lists;
- with RANSAC for the full 2,000 iterations (`min_inliers=4`) and bounded by what can still pass
  (`min_inliers=MATCH_INLIERS`, as the finder runs): time per candidate and the pairs that pass.
Each variant runs `--repeats` times, alternating; the last run of each is reported (the first
warms caches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from automl_cxr.data._dupcache import features_of_files
from automl_cxr.data._duplicates import (
    MATCH_INLIERS,
    MIN_CELLS,
    RATIO,
    mutual_matches,
    verify_pair,
)
from automl_cxr.data._shortlist import shortlist
from automl_cxr.settings import default_sources_dir


def _bf_matches(da: np.ndarray, db: np.ndarray) -> list[tuple[int, int]]:
    import cv2

    bf = cv2.BFMatcher(cv2.NORM_HAMMING)
    back = {m.queryIdx: m.trainIdx for m in bf.match(db, da)}
    return [
        (m[0].queryIdx, m[0].trainIdx)
        for m in bf.knnMatch(da, db, k=2)
        if len(m) == 2
        and m[0].distance < RATIO * m[1].distance
        and back.get(m[0].trainIdx) == m[0].queryIdx
    ]


def _faiss_matches(da: np.ndarray, db: np.ndarray) -> list[tuple[int, int]]:
    q, t = mutual_matches(da, db)
    return list(zip(q.tolist(), t.tolist(), strict=True))


def _timed(fn, items) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = [fn(*it) for it in items]
    return (time.perf_counter() - t0) / max(1, len(items)) * 1000, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_sources_dir())
    ap.add_argument("--nih", type=int, default=300)
    ap.add_argument("--cohen", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    paths = sorted((args.data / "nih" / "images").glob("*.png"))[: args.nih]
    paths += sorted((args.data / "cohen" / "images").glob("*"))[: args.cohen]
    feats = features_of_files(paths)
    todo = sorted(shortlist(feats, None))
    pairs = [(feats.image(a), feats.image(b)) for a, b in todo]
    desc = [(a[1], b[1]) for a, b in pairs]

    def passing(results) -> int:
        return sum(
            n >= MATCH_INLIERS and tr is not None and tr["cells"] >= MIN_CELLS for n, tr in results
        )

    res: dict[str, dict] = {}
    for _ in range(args.repeats):
        ms, bf = _timed(_bf_matches, desc)
        res["match_bfmatcher"] = {"ms_per_pair": round(ms, 3)}
        ms, fa = _timed(_faiss_matches, desc)
        res["match_faiss"] = {"ms_per_pair": round(ms, 3)}
        ms, full = _timed(lambda a, b: verify_pair(a, b, min_inliers=4), pairs)
        res["verify_ransac_2000"] = {"ms_per_candidate": round(ms, 3), "passing": passing(full)}
        ms, bounded = _timed(lambda a, b: verify_pair(a, b, min_inliers=MATCH_INLIERS), pairs)
        res["verify_ransac_bounded"] = {
            "ms_per_candidate": round(ms, 3),
            "passing": passing(bounded),
        }
    same = sum(sorted(x) == sorted(y) for x, y in zip(bf, fa, strict=True))
    out = {
        "command": "python benchmarks/duplicate_verification.py "
        f"--nih {args.nih} --cohen {args.cohen} --repeats {args.repeats}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "images": len(paths),
        "candidates": len(todo),
        "identical_match_lists": f"{same} of {len(todo)}",
        **res,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
