"""Memory of the frozen-feature cache in two worker processes: memory-mapped vs copied (issue 26).

A 2-worker cpu-profile search trains head-only trials on each image's pooled vectors, read from
the shared feature folder by both workers. At 50,000 images one backbone's entry is
50,000 x 2 x 1,280 float32 = 512 MB. This script writes such an entry once, then starts two
worker processes that each read it through `FeatureCache` and touch every value (as training
does) and the average-pooled rows a head-only trial trains on, and reports each worker's RSS
and PSS (`/proc/<pid>/smaps_rollup`: PSS counts a page shared by both workers half in each)
while both hold it. Variants, side by side in one run: `mapped` (today: the entry read with
`torch.load(..., mmap=True)`, the trial's rows a view of it) and `copied` (before: each worker
reads the file into its own memory and the trial makes a contiguous copy of its pooling).

    .venv/bin/python benchmarks/feature_cache_memory.py --images 50000
    (writes benchmarks/feature_cache_memory.json)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from automl_cxr.engine import FeatureCache, _features
from automl_cxr.models import combine_pooled


def _smaps() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:"):
            out[parts[0][:-1].lower()] = int(parts[1]) / 1024  # MB
    return out


def _worker(folder: str, key: str, copied: bool, ready, done, q) -> None:
    if copied:  # the cache before: every worker loads its own copy
        _features._load_mapped = lambda p: torch.from_numpy(np.load(p))
    base = _smaps()
    t = FeatureCache(directory=folder).get(key)
    assert t is not None
    # what a head-only avg-pool trial trains on: before, a contiguous copy of the pooling;
    # now a view of the entry (`combine_pooled`)
    x = combine_pooled(t, "avg")
    if copied:
        x = x.contiguous()
    total = float(t.sum()) + float(x[torch.arange(0, len(x), 7)].sum())  # touch every value
    ready.wait()  # both workers hold the entry now
    q.put({"pid": os.getpid(), "before": base, "holding": _smaps(), "checksum": total})
    done.wait()


def measure(folder: str, key: str, copied: bool) -> dict:
    ctx = mp.get_context("spawn")
    ready, done, q = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(folder, key, copied, ready, done, q)) for _ in (0, 1)
    ]
    for p in procs:
        p.start()
    rows = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=600)
    grow = [{k: r["holding"][k] - r["before"][k] for k in ("rss", "pss")} for r in rows]
    return {
        "workers": rows,
        "growth_rss_mb": [round(g["rss"], 1) for g in grow],
        "growth_pss_mb": [round(g["pss"], 1) for g in grow],
        "growth_pss_total_mb": round(sum(g["pss"] for g in grow), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--channels", type=int, default=1280)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("feature_cache_memory.json")
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mb = args.images * 2 * args.channels * 4 / 2**20
        FeatureCache(directory=folder, max_bytes=0).get_or_compute(
            "pooled", lambda: torch.randn(args.images, 2, args.channels)
        )
        res = {}
        for variant in ("copied", "mapped", "copied", "mapped"):  # the second of each is kept
            res[variant] = measure(folder, "pooled", copied=variant == "copied")
            print(variant, res[variant]["growth_rss_mb"], res[variant]["growth_pss_mb"], flush=True)
    out = {
        "command": f"python benchmarks/feature_cache_memory.py --images {args.images} "
        f"--channels {args.channels}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "entry_mb": round(mb, 1),
        **res,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"entry {mb:.0f} MB; two workers' PSS growth: copied "
        f"{res['copied']['growth_pss_total_mb']:.0f} MB, mapped "
        f"{res['mapped']['growth_pss_total_mb']:.0f} MB; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
