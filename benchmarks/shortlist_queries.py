"""Fewer shortlist queries per film: what they save and what they cost in recall (issue 28).

    python benchmarks/shortlist_queries.py [--queries 700,350,250] [--copies 500]
        [--json benchmarks/shortlist_queries.json]

The shortlist's search is most of the finder's time at scale (`DUPLICATES.md`), and it makes
one query per indexed ORB descriptor: 700 per film. Here every film still indexes its 700
strongest descriptors, but only its strongest Q query the index, for Q in `--queries` and four
vote thresholds (`MIN_VOTES` and lower, since fewer queries give fewer votes). Measured for
each: the search's seconds and the candidates it proposes per film (within the shared pool, as
`data prepare` searches: both films of a pair query), whether the pool's keypoint pairs (Q =
700) are still proposed, and how often a re-framed copy's original is proposed (the
`duplicates.py` copies of seeds 0 and 1, searched against the pool as `--external` does: the
copy's queries only). Nothing else running; 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from duplicates import _pool  # noqa: E402

from automl_cxr.data import decode_gray  # noqa: E402
from automl_cxr.data._duplicates import find_matches  # noqa: E402
from automl_cxr.data._keypoints import LocalFeatures, extract_features  # noqa: E402
from automl_cxr.data._reframe import reframe  # noqa: E402
from automl_cxr.data._shortlist import MIN_VOTES, candidates, vote_counts  # noqa: E402
from automl_cxr.settings import default_sources_dir  # noqa: E402

THRESHOLDS = (MIN_VOTES, 5, 4, 3)


def _votes(query: LocalFeatures, base: LocalFeatures, same: bool, q: int):
    """(pair codes, votes, seconds: index built and searched) with each film's strongest `q`
    querying."""
    t0 = time.perf_counter()
    codes, votes = vote_counts(query, base, same, q)
    return codes, votes, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_sources_dir())
    ap.add_argument("--queries", default="700,350,250")
    ap.add_argument("--copies", type=int, default=500)
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("shortlist_queries.json"))
    args = ap.parse_args()
    pool = _pool(args.data)
    imgs = [decode_gray(p).pixels for p in pool["path"]]
    feats = extract_features(imgs)
    pairs = {(m.a, m.b) for m in find_matches(feats)}  # keypoint pairs, all 700 querying
    copies = {}
    for seed in (0, 1):  # as duplicates.py draws them
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(imgs), args.copies, replace=False)
        copies[seed] = (idx, extract_features([reframe(imgs[i], rng).pixels for i in idx]))
    rows = []
    for q in (int(x) for x in args.queries.split(",")):
        codes, votes, seconds = _votes(feats, feats, True, q)
        row = {"queries_per_film": q, "votes_seconds_pool": round(seconds, 2), "by_min_votes": {}}
        copy_votes = {seed: _votes(cf, feats, False, q)[:2] for seed, (_, cf) in copies.items()}
        for mv in THRESHOLDS:
            todo = set(candidates(codes, votes, len(feats), True, mv))
            r = {
                "pool_pairs_proposed": len(pairs & todo),
                "candidates_per_film": round(len(todo) / len(feats), 3),
            }
            for seed, (idx, _) in copies.items():
                short = set(candidates(*copy_votes[seed], len(feats), False, mv))
                r[f"copies_seed{seed}_original_proposed"] = float(
                    np.mean([(k, int(i)) in short for k, i in enumerate(idx)])
                )
            row["by_min_votes"][mv] = r
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.json.write_text(
        json.dumps(
            {
                "command": f"python benchmarks/shortlist_queries.py --queries {args.queries} "
                f"--copies {args.copies}",
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                f"{platform.python_version()}",
                "pool_films": len(feats),
                "pool_keypoint_pairs": len(pairs),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
