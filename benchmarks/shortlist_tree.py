"""A vocabulary-tree shortlist against the finder's: what it saves and what it costs in recall
(issue 28 "Cost").

    python benchmarks/shortlist_tree.py [--films 50000] [--configs 64,130,2 64,260,3]
        [--json benchmarks/shortlist_tree.json]

The finder's shortlist makes one approximate nearest-neighbour query per indexed ORB
descriptor (700 per film), through an inverted file of ~1,000 codes per list behind a
two-level quantizer, 3 lists probed (`automl_cxr/data/_shortlist.py`). The design measured
here instead (the one left untried in `DUPLICATES.md`): a tree of binary k-means centres,
`branch` per level, down to leaves of about `leaf` codes (leaf centres drawn from the codes),
`probe` centres followed at every level; built as nested faiss `IndexBinaryIVF`s, so every
level is faiss's own C++ search. Votes, the vote threshold and the `SHORTLIST` best candidates
are the finder's own (`vote_counts`' rule, `candidates`).

Measured, every index built and searched in this one run (nothing else running, 2 threads):
1. **Keypoints' share of a film's cost**: 200 of `benchmarks/scale.py`'s 1024 px films
   (PNG/JPEG), decoding beside the finder's keypoints (`local_features`), one thread.
2. **The shared pool** (2,939 films, every pair searched within it as `data prepare` does):
   seconds to build and search, microseconds per query, candidates per film, whether the
   pool's pairs (`find_matches` today) are proposed, and how often a re-framed copy's original
   is proposed (`duplicates.py`'s copies, seeds 0 and 1, searched as `--external` searches).
3. **`--films` synthetic films** made as `scale.py` makes them (crops of the 1,678 shared source
   films, so each source film has ~30 re-framed copies at 50,000), keypoints taken in memory:
   the same-set search's build and search seconds (ms per film) and how many films whose
   source film (same flip) is among the others have one of them among their candidates.
4. **A dense index**: the pool plus the synthetic films in one index (37 M codes at 50,000), the
   copies of 2. searched against it: how often a film made from the copy's source film
   (unflipped, the original included) is proposed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from duplicates import _pool  # noqa: E402
from scale import SIDE, _films, _make_one, draws  # noqa: E402

from automl_cxr.data import _shortlist, decode_gray  # noqa: E402
from automl_cxr.data._duplicates import find_matches  # noqa: E402
from automl_cxr.data._keypoints import LocalFeatures, extract_features, local_features  # noqa: E402
from automl_cxr.data._reframe import reframe  # noqa: E402
from automl_cxr.data._shortlist import (  # noqa: E402
    _strongest,
    candidates,
    nearest_owners,
    shortlist_index,
    tally_votes,
)
from automl_cxr.settings import default_sources_dir  # noqa: E402

_TRAIN_PER_LEAF = 20


def _kmeans(codes: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The shortlist's binary k-means (`_shortlist._kmeans`) on at most 160 codes per centre,
    drawn before the codes are unpacked to floats."""
    if k >= len(codes):
        return codes.copy()
    if len(codes) > k * 160:
        codes = codes[np.random.default_rng(seed).choice(len(codes), k * 160, replace=False)]
    return _shortlist._kmeans(codes, k, seed=seed, niter=10)


def tree_index(codes: np.ndarray, branch: int, leaf: int, probe: int):
    """Nested faiss binary IVFs: k-means levels of `branch` centres, then leaves of ~`leaf`
    codes (centres drawn from a sample of each cell), `probe` followed at every level."""
    import faiss

    n_leaves = max(16, len(codes) // leaf)
    depth = max(1, round(np.log(n_leaves) / np.log(branch)))
    rng = np.random.default_rng(0)
    sample = codes[rng.choice(len(codes), min(len(codes), n_leaves * _TRAIN_PER_LEAF), False)]
    levels, groups = [], [sample]
    for level in range(depth):
        last, centres, split = level == depth - 1, [], []
        for g, part in enumerate(groups):
            if not len(part):
                continue
            if last:
                k = max(1, round(n_leaves * len(part) / len(sample)))
                c = part[rng.choice(len(part), min(k, len(part)), replace=False)]
            else:
                c = _kmeans(part, branch, seed=g)
                _, near = faiss.knn_hamming(part, c, 1)
                split += [part[near[:, 0] == j] for j in range(len(c))]
            centres.append(c)
        levels.append(np.concatenate(centres))
        groups = split
    q = faiss.IndexBinaryFlat(256)
    q.add(levels[0])
    keep = [q]
    for centres, parents in zip(levels[1:] + [None], levels, strict=True):
        ivf = faiss.IndexBinaryIVF(q, 256, len(parents))
        ivf.is_trained, ivf.nprobe = True, probe
        ivf.add(codes if centres is None else centres)
        keep.append(ivf)
        q = ivf
    q.referenced_objects = keep[:-1]  # faiss does not own its quantizers
    return q


class _QueryByQuery:
    """A tree searched by faiss query by query: `nearest_owners` searches an `IndexBinaryIVF`
    list by list, a Python loop over the tree's ~270,000 leaves; anything else through its
    `search`, as here."""

    def __init__(self, index) -> None:
        self.index, self.ntotal = index, index.ntotal

    def search(self, x: np.ndarray, k: int):
        return self.index.search(x, k)


def _votes(query: LocalFeatures, base: LocalFeatures, same: bool, cfg: str):
    """`vote_counts` with the finder's index (`cfg` "current") or a tree; (pair codes, votes,
    build s, search s, queries)."""
    sel, owner = _strongest(base)
    codes = np.ascontiguousarray(base.descriptors[sel])
    t0 = time.perf_counter()
    if cfg == "current":
        index = shortlist_index(codes)
    else:
        index = _QueryByQuery(tree_index(codes, *(int(v) for v in cfg.split(","))))
    t_build = time.perf_counter() - t0
    if same:
        x, qi = codes, owner
    else:
        rows, qi = _strongest(query)
        x = query.descriptors[rows]
    t0 = time.perf_counter()
    d, o = nearest_owners(index, owner, x, qi if same else None)
    t_search = time.perf_counter() - t0
    return (*tally_votes(qi, d, o, len(base), same), t_build, t_search, len(x))


def _synthetic(n: int) -> tuple[LocalFeatures, list[str]]:
    """Keypoints of `scale.make_inputs(n)`'s films (its `draws`, its `_make_one`), each written
    to one temporary file and read back instead of kept on disk, and each film's source key
    (source path, flipped or not)."""
    import cv2

    plan = [src for *_, src in draws(n)]
    keys = []
    with tempfile.TemporaryDirectory(prefix="shortlist_tree_") as work:

        def film(i: int) -> np.ndarray:
            out = Path(work) / f"film.{'png' if i % 2 == 0 else 'jpg'}"  # as scale.py writes it
            flip = _make_one((i, str(plan[i]), str(out), ""))
            keys.append(f"{os.path.realpath(plan[i])}|{'flip' if flip else ''}")
            return cv2.imread(str(out), cv2.IMREAD_GRAYSCALE)

        t0 = time.perf_counter()
        feats = extract_features(film(i) for i in range(n))
    print(f"{n} synthetic films' keypoints in {time.perf_counter() - t0:.0f} s", flush=True)
    return feats, keys


def _keypoint_share() -> dict:
    covid, normal = _films()
    films, paths = covid + normal, []
    with tempfile.TemporaryDirectory(prefix="shortlist_tree_kp_") as work:
        for i in range(200):
            p = Path(work) / f"img{i:04d}.{'png' if i % 2 == 0 else 'jpg'}"
            _make_one((i, str(films[(i * 7919) % len(films)]), str(p), ""))
            paths.append(p)
        t0 = time.perf_counter()
        imgs = [decode_gray(p).pixels for p in paths]
        t1 = time.perf_counter()
    for img in imgs:
        local_features(img)
    t2 = time.perf_counter()
    return {
        "films": len(paths),
        "side": SIDE,
        "decode_ms": round((t1 - t0) / len(paths) * 1e3, 2),
        "keypoints_ms": round((t2 - t1) / len(paths) * 1e3, 2),
    }


def _row(cfg: str, tb: float, ts: float, nq: int, films: int) -> dict:
    return {
        "config": cfg,
        "build_s": round(tb, 1),
        "search_s": round(ts, 1),
        "us_per_query": round(ts / nq * 1e6, 2),
        "ms_per_film": round((tb + ts) / films * 1e3, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--films", type=int, default=50_000)
    ap.add_argument("--configs", nargs="+", default=["64,130,2", "64,260,3"])
    ap.add_argument("--copies", type=int, default=500)
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("shortlist_tree.json"))
    args = ap.parse_args()
    configs = ["current", *args.configs]
    out: dict = {
        "command": f"python benchmarks/shortlist_tree.py --films {args.films} "
        f"--configs {' '.join(args.configs)}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out["keypoint_share"] = _keypoint_share()
    print(json.dumps(out["keypoint_share"]), flush=True)

    table = _pool(default_sources_dir())
    imgs = [decode_gray(p).pixels for p in table["path"]]
    pool = extract_features(imgs)
    pairs = {(m.a, m.b) for m in find_matches(pool, paths=table["path"].astype(str).tolist())}
    copies = {}
    for seed in (0, 1):  # as duplicates.py draws them
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(imgs), args.copies, replace=False)
        copies[seed] = (idx, extract_features([reframe(imgs[i], rng).pixels for i in idx]))
    del imgs
    out["pool"] = {"films": len(pool), "pairs": len(pairs), "rows": []}
    for cfg in configs:
        codes, votes, tb, ts, nq = _votes(pool, pool, True, cfg)
        todo = set(candidates(codes, votes, len(pool), True))
        row = _row(cfg, tb, ts, nq, len(pool))
        row["candidates_per_film"] = round(len(todo) / len(pool), 3)
        row["pool_pairs_proposed"] = len(pairs & todo)
        for seed, (idx, cf) in copies.items():
            short = set(candidates(*_votes(cf, pool, False, cfg)[:2], len(pool), False))
            row[f"copies_seed{seed}_original_proposed"] = float(
                np.mean([(k, int(i)) in short for k, i in enumerate(idx)])
            )
        out["pool"]["rows"].append(row)
        print(json.dumps(row), flush=True)

    synth, keys = _synthetic(args.films)
    count = Counter(keys)
    twin = np.array([count[k] > 1 for k in keys])
    out["synthetic"] = {"films": args.films, "films_with_a_twin": int(twin.sum()), "rows": []}
    for cfg in configs:
        codes, votes, tb, ts, nq = _votes(synth, synth, True, cfg)
        linked = np.zeros(args.films, bool)
        for a, b in candidates(codes, votes, args.films, True):
            if keys[a] == keys[b]:
                linked[a] = linked[b] = True
        row = _row(cfg, tb, ts, nq, args.films)
        row["twins_proposed"] = round(float(linked[twin].mean()), 4)
        out["synthetic"]["rows"].append(row)
        print(json.dumps(row), flush=True)

    pool_keys = [f"{os.path.realpath(p)}|" for p in table["path"]]
    base_keys = pool_keys + keys
    base = LocalFeatures(
        np.concatenate([pool.points, synth.points]),
        np.concatenate([pool.descriptors, synth.descriptors]),
        np.concatenate([pool.offsets, synth.offsets[1:] + pool.offsets[-1]]),
        np.concatenate([pool.sizes, synth.sizes]),
    )
    del synth
    out["dense"] = {"films": len(base), "rows": []}
    for cfg in configs:
        row = {"config": cfg}
        for seed, (idx, cf) in copies.items():
            codes, votes, tb, ts, nq = _votes(cf, base, False, cfg)
            per: dict[int, list[int]] = {}
            for a, b in candidates(codes, votes, len(base), False):
                per.setdefault(a, []).append(b)
            row[f"copies_seed{seed}_source_proposed"] = float(
                np.mean(
                    [
                        any(base_keys[b] == pool_keys[int(i)] for b in per.get(k, []))
                        for k, i in enumerate(idx)
                    ]
                )
            )
            row[f"build_s_seed{seed}"] = round(tb, 1)
            row[f"us_per_query_seed{seed}"] = round(ts / nq * 1e6, 2)
        out["dense"]["rows"].append(row)
        print(json.dumps(row), flush=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
