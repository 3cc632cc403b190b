"""Step 2 of the duplicate finder: which pairs of images are worth verifying.

The strongest `INDEX_FEATURES` ORB descriptors of every image go into a faiss binary
inverted-file index (Hamming distance). Each descriptor of a query image votes for the image
that owns its nearest neighbour (within `VOTE_DISTANCE` bits); the `SHORTLIST` images with most
votes (at least `MIN_VOTES`) are the candidates. No pair of images is compared unless the index
proposes it. (faiss rather than scikit-learn: scikit-learn has no index for binary codes, and
its Hamming metric on unpacked bits is brute force.)

**A query costs the same at any size.** The index has one list per `LIST_CODES` indexed
descriptors, so a query that probes `PROBE` lists scans about the same number of codes whether
the set holds 2,000 films or 50,000. The list centres are found by a two-level k-means (about
√lists coarse centres, then each coarse cluster split in proportion to its share), and a
query finds its lists through the coarse centres first (`COARSE_PROBE` of them): both the
training and the quantizer's cost per query grow as the square root of the list count, not
with it. The lists are searched one at a time against every query that probes them
(`nearest_owners`), which finds the same nearest codes as faiss's query-by-query search,
1.2-1.7x faster. Measured in `benchmarks/DUPLICATES.md` ("The shortlist at scale").
"""

from __future__ import annotations

import math

import numpy as np

from automl_cxr.data._keypoints import LocalFeatures

__all__ = [
    "COARSE_PROBE",
    "INDEX_FEATURES",
    "LIST_CODES",
    "MIN_VOTES",
    "PROBE",
    "SHORTLIST",
    "VOTE_DISTANCE",
    "candidates",
    "nearest_owners",
    "shortlist",
    "shortlist_index",
    "tally_votes",
    "vote_counts",
]

INDEX_FEATURES = 700
"""Strongest keypoints per image that vote in the shortlist index (all of them: with 300, 7 % of
re-framed copies drop out of the shortlist, measured)."""
VOTE_DISTANCE = 64
"""A descriptor votes for its nearest neighbour's image only within this Hamming distance (of 256
bits)."""
SHORTLIST = 5
"""Candidates verified per image."""
MIN_VOTES = 7
"""A candidate needs at least this many votes to be verified (measured: re-framed copies' 2nd
percentile is 8; on the shared pool this leaves about one candidate per image)."""
LIST_CODES = 1000
"""Indexed descriptors per inverted list (on average): the codes a query scans per probed list,
whatever the number of images."""
PROBE = 3
"""Lists a query scans."""
COARSE_PROBE = 4
"""Coarse centres a query looks through for its `PROBE` lists."""
_FLAT_BELOW = 20_000
"""Fewer indexed descriptors than this are searched exhaustively (exact, and faster)."""
_TRAIN_PER_LIST = 40
"""Training descriptors per list (faiss's k-means asks for at least 39 per centre)."""

_BITS = 256
_BLOCK = 2_000_000
"""Query descriptors searched at a time (their probes and nearest codes: ~100 MB)."""
_ID_BITS = 40
"""Bits of a code's id in `nearest_owners`' (distance, id) key."""


def _kmeans(codes: np.ndarray, k: int, *, seed: int, niter: int) -> np.ndarray:
    """`k` binary centres of `codes` (k-means on their bits, centres rounded back to bits)."""
    import faiss

    x = np.unpackbits(codes, axis=1).astype(np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=_TRAIN_PER_LIST * 4,
    )
    km.train(x)
    return np.packbits(km.centroids > 0.5, axis=1)


def _centres(codes: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """(coarse centres, list centres) of a two-level k-means on a sample of `codes`."""
    import faiss

    rng = np.random.default_rng(0)
    sample = codes[rng.choice(len(codes), min(len(codes), nlist * _TRAIN_PER_LIST), replace=False)]
    n_coarse = max(8, round(math.sqrt(nlist)))
    coarse = _kmeans(sample, n_coarse, seed=0, niter=20)
    flat = faiss.IndexBinaryFlat(_BITS)
    flat.add(coarse)
    _, near = flat.search(sample, 1)
    near = near[:, 0]
    fine = []
    for c in range(n_coarse):
        part = sample[near == c]
        if len(part) == 0:
            continue
        k = max(1, round(nlist * len(part) / len(sample)))
        fine.append(part if k >= len(part) else _kmeans(part, k, seed=c + 1, niter=10))
    return coarse, np.concatenate(fine)


def shortlist_index(codes: np.ndarray):
    """A faiss binary index of `codes` (uint8, 32 bytes each) for the shortlist's searches:
    exhaustive below `_FLAT_BELOW` codes, else an inverted file of about `LIST_CODES` codes per
    list behind a two-level quantizer (see the module's docstring)."""
    import faiss

    codes = np.ascontiguousarray(codes, np.uint8)
    if len(codes) < _FLAT_BELOW:
        index = faiss.IndexBinaryFlat(_BITS)
    else:
        coarse, fine = _centres(codes, max(16, len(codes) // LIST_CODES))
        top = faiss.IndexBinaryFlat(_BITS)
        quantizer = faiss.IndexBinaryIVF(top, _BITS, len(coarse))
        quantizer.quantizer.add(coarse)
        quantizer.is_trained = True
        quantizer.add(fine)
        quantizer.nprobe = COARSE_PROBE
        index = faiss.IndexBinaryIVF(quantizer, _BITS, len(fine))
        index.is_trained = True
        index.nprobe = PROBE
        index.referenced_objects = [top, quantizer]  # faiss does not own them
    if len(codes):
        index.add(codes)
    return index


def _strongest(feats: LocalFeatures, limit: int = INDEX_FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """Rows of every image's `limit` strongest keypoints, and the image owning each."""
    rows, owners = [], []
    for i in range(len(feats)):
        s, e = int(feats.offsets[i]), int(feats.offsets[i + 1])
        e = min(e, s + limit)
        rows.append(np.arange(s, e))
        owners.append(np.full(e - s, i, dtype=np.int64))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(owners)


def nearest_owners(
    index, owner: np.ndarray, x: np.ndarray, x_owner: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Hamming distance, owning image) of each row of `x`'s nearest code in `index` (a
    `shortlist_index` whose codes belong to the images `owner`), skipping codes of the row's
    own image `x_owner` when given (-1 and a distance above any when there is none).

    An inverted file is searched list by list, not query by query: the queries that probe one
    list are compared with its codes in one exhaustive block (`faiss.knn_hamming`). It scans
    the same codes as the index's own search, 1.2-1.7x faster when every indexed code queries
    (measured in `benchmarks/DUPLICATES.md`), and finds the same owners: between equally near
    codes the first indexed wins, as in faiss."""
    import faiss

    n, k = len(x), 8 if x_owner is not None else 1
    # (distance, code id) as one key: between equally near codes (Hamming distances tie often)
    # the first indexed wins, as in faiss's own search, so a query's tied votes all go to the
    # same image instead of being spread over its copies
    best = np.full(n, (_BITS + 1) << _ID_BITS, np.int64)
    best_owner = np.full(n, -1, np.int64)

    def keep(q: np.ndarray, dist: np.ndarray, near: np.ndarray) -> None:
        """Fold one block's k nearest codes (of rows q of x) into best / best_owner."""
        own = np.where(near >= 0, owner[np.clip(near, 0, None)], -1)
        ok = own >= 0
        if x_owner is not None:
            ok &= own != x_owner[q][:, None]
        first = np.argmax(ok, axis=1)
        pick = np.arange(len(q)), first
        key = np.where(ok[pick], (dist[pick].astype(np.int64) << _ID_BITS) + near[pick], best[q])
        better = key < best[q]
        best[q[better]], best_owner[q[better]] = key[better], own[pick][better]

    if not isinstance(index, faiss.IndexBinaryIVF):
        for s in range(0, n, _BLOCK):
            q = np.arange(s, min(n, s + _BLOCK))
            keep(q, *index.search(np.ascontiguousarray(x[q]), k))
        return (best >> _ID_BITS).astype(np.int32), best_owner
    lists = []
    for i in range(index.nlist):
        size = index.invlists.list_size(i)
        codes = faiss.rev_swig_ptr(index.invlists.get_codes(i), size * index.code_size)
        ids = faiss.rev_swig_ptr(index.invlists.get_ids(i), size)
        lists.append((codes.reshape(size, index.code_size), ids))
    for s in range(0, n, _BLOCK):
        block = np.ascontiguousarray(x[s : s + _BLOCK])
        _, probes = index.quantizer.search(block, index.nprobe)
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")
        rows = order // index.nprobe + s
        cuts = np.flatnonzero(np.diff(flat[order])) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(order)], strict=True):
            probed = flat[order[lo]]  # -1: fewer than nprobe lists found
            if probed < 0 or len(lists[probed][0]) == 0:
                continue
            codes, ids = lists[probed]
            q = rows[lo:hi]
            dist, j = faiss.knn_hamming(x[q], codes, min(k, len(codes)))
            keep(q, dist, ids[j])
    return (best >> _ID_BITS).astype(np.int32), best_owner


def vote_counts(
    query: LocalFeatures,
    base: LocalFeatures,
    same: bool,
    queries: int = INDEX_FEATURES,
) -> tuple[np.ndarray, np.ndarray]:
    """(pair codes `a * len(base) + b`, votes) of every (query image, base image) pair that
    got a vote, or with `same` of every pair within `base` (a < b). Every image's strongest
    `INDEX_FEATURES` descriptors are indexed; each query image's strongest `queries` vote."""
    sel, owner = _strongest(base)
    codes = np.ascontiguousarray(base.descriptors[sel])
    del sel
    index = shortlist_index(codes)  # holds its own copy of the codes
    if index.ntotal == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if same and queries >= INDEX_FEATURES:  # the indexed codes query: no second copy (1.1 GB
        x, qi = codes, owner  # at 50,000 films)
    else:
        del codes
        rows, qi = _strongest(base if same else query, queries)
        x = (base if same else query).descriptors[rows]
        del rows
    d, o = nearest_owners(index, owner, x, qi if same else None)
    del x, index
    return tally_votes(qi, d, o, len(base), same)


def tally_votes(
    query_owner: np.ndarray, dist: np.ndarray, owner: np.ndarray, n_base: int, same: bool
) -> tuple[np.ndarray, np.ndarray]:
    """`vote_counts`' output from each query descriptor's image, its nearest code's distance
    and that code's image: a vote within `VOTE_DISTANCE` counts for the pair."""
    ok = dist <= VOTE_DISTANCE
    a, b = query_owner[ok], owner[ok]
    if same:
        a, b = np.minimum(a, b), np.maximum(a, b)
    return np.unique(a * n_base + b, return_counts=True)


def candidates(
    codes: np.ndarray,
    votes: np.ndarray,
    n_base: int,
    same: bool,
    min_votes: int = MIN_VOTES,
) -> dict[tuple[int, int], int]:
    """The pairs to verify, with their votes, from `vote_counts`' output: each query image's
    `SHORTLIST` best-voted base images (most votes first, then the lower index) with at least
    `min_votes`; with `same`, each image of a pair proposes it (keys a < b)."""
    keep = votes >= min_votes
    per: dict[int, list[tuple[int, int]]] = {}
    for code, n in zip(codes[keep], votes[keep], strict=True):
        a, b = divmod(int(code), n_base)
        per.setdefault(a, []).append((b, int(n)))
        if same:
            per.setdefault(b, []).append((a, int(n)))
    todo: dict[tuple[int, int], int] = {}
    for a, lst in per.items():
        for b, n in sorted(lst, key=lambda x: (-x[1], x[0]))[:SHORTLIST]:
            key = (min(a, b), max(a, b)) if same else (a, b)
            todo[key] = max(todo.get(key, 0), n)
    return todo


def shortlist(
    query: LocalFeatures, base: LocalFeatures | None = None
) -> dict[tuple[int, int], int]:
    """The candidate pairs the finder verifies, with their votes: (query image, base image), or
    with `base=None` pairs within `query` (a < b)."""
    same = base is None
    base = query if base is None else base
    return candidates(*vote_counts(query, base, same), len(base), same)
