"""The shortlist index's cost per query as the indexed descriptors grow (issue 28 "Cost").

    python benchmarks/shortlist_scale.py [--times 1,4,8] [--queries 100000]
        [--json benchmarks/shortlist_scale.json]

Descriptors: the strongest 700 ORB descriptors of every shared film (2,939 films, about 2.06 M
codes), and for 4x and 8x that many, further copies of each with 3 % of its bits flipped (so a
query's near neighbours exist at every size, as a collection's copies and follow-ups make
them). For each size, the index the finder uses (`shortlist_index`: about `LIST_CODES` codes per
list behind a two-level quantizer) beside the one it replaced (a flat-quantizer inverted file
with sqrt(M) lists up to 1,024 and sqrt(M)/2 beyond 4 M codes, 2 probed), built and searched in
one run: build seconds, microseconds per query (k = 8, the finder's within-set search), codes a
query scans (the sizes of the lists it probes), and how often the query's planted near copy is
its nearest neighbour found; and for `shortlist_index`, under the finder's load (a quarter of
all codes, 3 % flipped, as queries), faiss's search beside the one the finder makes of it
(`nearest_owners`: list by list, k = 8 per list). 2 threads (faiss's OpenMP), nothing else
running.
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

from automl_cxr.data._dupcache import features_of_files  # noqa: E402
from automl_cxr.data._shortlist import (  # noqa: E402
    PROBE,
    _strongest,
    nearest_owners,
    shortlist_index,
)
from automl_cxr.settings import default_sources_dir  # noqa: E402


def fixed_lists_index(codes: np.ndarray):
    """The index before 2026-12-06 (fifth session): list count sqrt(M) capped at 1,024 until
    4 M codes, sqrt(M)/2 beyond; trained on 40 codes per list; 2 lists probed."""
    import faiss

    nlist = int(max(64, min(1024, np.sqrt(len(codes))), np.sqrt(len(codes)) / 2))
    index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(256), 256, nlist)
    rng = np.random.default_rng(0)
    index.train(codes[rng.choice(len(codes), min(len(codes), nlist * 40), replace=False)])
    index.nprobe = 2
    index.add(codes)
    return index


def _flipped(
    codes: np.ndarray, rng: np.random.Generator, p: float = 0.03, dtype: type = np.float64
) -> np.ndarray:
    """`codes` with each bit flipped with probability `p` (`dtype` of the uniform draws: float32
    halves their memory; float64 is `rng.random`'s default stream)."""
    bits = np.unpackbits(codes, axis=1)
    return np.packbits(bits ^ (rng.random(bits.shape, dtype=dtype) < p), axis=1)


def _scanned(index, queries: np.ndarray) -> float:
    sizes = np.array([index.invlists.list_size(i) for i in range(index.nlist)])
    _, lists = index.quantizer.search(queries, index.nprobe)
    return float(sizes[lists].sum(axis=1).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--times", default="1,4,8")
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("shortlist_scale.json"))
    args = ap.parse_args()
    pool = _pool(default_sources_dir())
    feats = features_of_files(pool["path"].tolist())
    sel, owner = _strongest(feats)
    base = np.ascontiguousarray(feats.descriptors[sel])
    rng = np.random.default_rng(1)
    parts, rows = [base], []
    for times in sorted(int(t) for t in args.times.split(",")):
        while len(parts) < times:
            parts.append(_flipped(base, rng))
        codes = np.concatenate(parts[:times])
        pick = rng.choice(len(base), args.queries, replace=False)
        queries = _flipped(base[pick], rng)
        row = {"times": times, "codes": len(codes), "films": len(feats) * times}
        for name, build in (
            ("fixed_lists", fixed_lists_index),
            ("shortlist_index", shortlist_index),
        ):
            t0 = time.perf_counter()
            index = build(codes)
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, near = index.search(queries, 8)
            t_search = time.perf_counter() - t0
            found = np.mean(near[:, 0] % len(base) == pick)
            if name == "shortlist_index":
                # the finder's search (list by list, k = 8 per list) under the finder's load,
                # where every indexed code queries, so each list meets thousands of queries
                # (with only --queries a list at 8x meets ~20 and the per-list call dominates):
                # a quarter of the codes, flipped, through both searches
                own_rng = np.random.default_rng(100 + times)  # the other draws stay as they were
                step = 500_000
                many = np.concatenate(
                    [
                        _flipped(codes[i : i + step : 4], own_rng, dtype=np.float32)
                        for i in range(0, len(codes), step)
                    ]
                )
                t0 = time.perf_counter()
                nearest_owners(index, np.tile(owner, times), many, np.full(len(many), -1))
                t_list = time.perf_counter() - t0
                t0 = time.perf_counter()
                index.search(many, 8)
                t_faiss = time.perf_counter() - t0
                row["finder_load"] = {
                    "queries": len(many),
                    "us_per_query_faiss": round(t_faiss / len(many) * 1e6, 2),
                    "us_per_query_list_by_list": round(t_list / len(many) * 1e6, 2),
                }
            row[name] = {
                "lists": int(index.nlist),
                "probed": int(index.nprobe),
                "build_s": round(t_build, 1),
                "us_per_query": round(t_search / len(queries) * 1e6, 2),
                "codes_scanned_per_query": round(_scanned(index, queries)),
                "near_copy_found": round(float(found), 4),
            }
            del index
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.json.write_text(
        json.dumps(
            {
                "command": "python benchmarks/shortlist_scale.py " + " ".join(sys.argv[1:]),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                f"{platform.platform()}",
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "probe": PROBE,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
