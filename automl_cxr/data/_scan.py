"""Source images to manifest rows, the one pipeline every set goes through (`scan_pool`): decode
and reject broken files (`scan_images`), then find exact and re-framed copies and merge them
into one row with one patient and one site group (`dedupe`, `merge_copies`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from automl_cxr.data._dupcache import features_for, find_matches_keyed
from automl_cxr.data._duplicates import UnionFind
from automl_cxr.data._image import MIN_SIDE, decode_gray
from automl_cxr.data._keypoints import LocalFeatures, Progress
from automl_cxr.data._sources import SourceTable
from automl_cxr.errors import DataError, ImageDecodeError

__all__ = ["ScanResult", "dedupe", "merge_copies", "scan_images", "scan_pool"]


@dataclass
class ScanResult:
    """Every image of a pool decoded once: the usable rows, and the rejected files with reasons."""

    table: pd.DataFrame  # pool rows + sha256, width, height, format, notes
    features: LocalFeatures  # the duplicate finder's keypoints, row-aligned with `table`
    rejected: list[dict[str, str]] = field(default_factory=list)


def _decode_one(path: str, min_side: int) -> tuple[dict, tuple | None, str | None]:
    try:
        img = decode_gray(path, min_side=min_side)
    except ImageDecodeError as exc:
        return {}, None, exc.reason
    info = {
        "sha256": img.sha256,
        "width": img.width,
        "height": img.height,
        "format": img.format,
        "notes": "; ".join(img.notes),
    }
    return info, features_for(img.pixels, img.sha256), None


def scan_images(
    pool: pd.DataFrame,
    *,
    skip_bad: bool = False,
    min_side: int = MIN_SIDE,
    progress: Progress | None = None,
    workers: int | None = None,
    noun: str = "image",
) -> ScanResult:
    """Decode every image of `pool` once (threads: Pillow releases the GIL while decoding).

    A file that cannot be used raises DataError naming it and the reason (`noun` names what
    the images are, e.g. "external image"), unless `skip_bad`, in which case it is left out
    and listed in `rejected`.
    """
    paths = pool["path"].tolist()
    infos: list[dict] = [{}] * len(paths)
    feats: list[tuple | None] = [None] * len(paths)
    rejected: list[dict[str, str]] = []
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for i, (info, th, err) in enumerate(ex.map(lambda p: _decode_one(p, min_side), paths)):
            if err is not None:
                rejected.append({"path": paths[i], "reason": err})
            infos[i], feats[i] = info, th
            if progress:
                progress(i + 1, len(paths))
    if rejected and not skip_bad:
        lines = "\n".join(f"  {r['path']}: {r['reason']}" for r in rejected[:20])
        more = f"\n  ... and {len(rejected) - 20} more" if len(rejected) > 20 else ""
        raise DataError(
            f"{len(rejected)} {noun}(s) cannot be used:\n{lines}{more}\n"
            "Fix or remove them, or pass --skip-bad to leave them out (they are then listed "
            "as rejected)."
        )
    ok = [i for i, t in enumerate(feats) if t is not None]
    table = pool.iloc[ok].reset_index(drop=True)
    extra = (
        pd.DataFrame([infos[i] for i in ok])
        if ok
        else pd.DataFrame(columns=["sha256", "width", "height", "format", "notes"])
    )
    table = pd.concat([table, extra.reset_index(drop=True)], axis=1)
    return ScanResult(table, LocalFeatures.stack([feats[i] for i in ok]), rejected)


def dedupe(scan: ScanResult) -> tuple[pd.DataFrame, LocalFeatures, dict]:
    """Drop exact duplicates (same bytes); a duplicate under two labels is a conflict (all
    copies dropped, reported)."""
    t = scan.table
    dup_report: list[dict] = []
    conflicts: list[dict] = []
    keep = np.ones(len(t), dtype=bool)
    for sha, idx in t.groupby("sha256").indices.items():
        if len(idx) < 2:
            continue
        labels = sorted(set(t["label"].iloc[idx]))
        paths = t["path"].iloc[idx].tolist()
        if len(labels) > 1:
            conflicts.append({"sha256": sha, "paths": paths, "labels": labels})
            keep[idx] = False
        else:
            dup_report.append({"sha256": sha, "kept": paths[0], "removed": paths[1:]})
            keep[idx[1:]] = False
    removed = int(sum(len(d["removed"]) for d in dup_report))
    return (
        t[keep].reset_index(drop=True),
        scan.features.take(np.flatnonzero(keep)),
        {
            "duplicates_removed": removed,
            "duplicates": dup_report,
            "label_conflicts": conflicts,
        },
    )


def merge_copies(
    table: pd.DataFrame,
    features: LocalFeatures,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[pd.DataFrame, LocalFeatures, list[dict], list[dict]]:
    """Run the duplicate finder over the pool (`data/_duplicates.py`).

    A copy (the same radiograph re-framed) becomes one image: the largest copy is kept, the
    others are removed, and all their patients become one split group; copies under two labels
    are a label conflict (all dropped). A same-patient match (a follow-up film) joins the two
    patients' split groups and keeps both images. Returns the table with `group_id`, its
    features, the matches (with evidence and what was done) and the label conflicts. A copy
    pair implied by others (A-B and B-C make A-C one radiograph too) is not verified and not
    listed (`find_matches(skip_merged=True)`); `timings` gets the finder's (`find_matches`)."""
    paths, patients = table["path"].tolist(), table["patient_id"].astype(str).tolist()
    matches = find_matches_keyed(
        features, table["sha256"].astype(str), paths=paths, progress=progress, timings=timings
    )
    img = UnionFind(map(str, range(len(table))))
    for m in matches:
        if m.kind == "copy":
            img.join(str(m.a), str(m.b))
    clusters: dict[str, list[int]] = {}
    for i in range(len(table)):
        clusters.setdefault(img.find(str(i)), []).append(i)
    keep = np.ones(len(table), dtype=bool)
    conflicts: list[dict] = []
    kept_of: dict[int, int] = {}
    area = (table["width"].astype(float) * table["height"].astype(float)).to_numpy()
    for rows in clusters.values():
        if len(rows) < 2:
            continue
        labels = sorted(set(table["label"].iloc[rows]))
        if len(labels) > 1:
            keep[rows] = False
            conflicts.append({"kind": "copy", "paths": [paths[i] for i in rows], "labels": labels})
            continue
        best = max(rows, key=lambda i: (area[i], -i))
        for i in rows:
            kept_of[i] = best
            keep[i] = i == best
    pats = UnionFind(patients)
    report = []
    for m in matches:
        pats.join(patients[m.a], patients[m.b])
        if m.kind == "copy":
            action = "copies merged" if keep[kept_of.get(m.a, m.a)] else "label conflict"
        else:
            action = "patients joined"
        report.append(
            {
                "a": paths[m.a],
                "b": paths[m.b],
                "sources": [str(table["source"].iloc[m.a]), str(table["source"].iloc[m.b])],
                "patients": [patients[m.a], patients[m.b]],
                "action": action,
                "kept": paths[kept_of[m.a]] if m.kind == "copy" and m.a in kept_of else None,
                **m.evidence(),
            }
        )
    groups = [pats.find(p) for p in patients]
    out = table.assign(group_id=groups)[keep].reset_index(drop=True)
    return out, features.take(np.flatnonzero(keep)), report, conflicts


def scan_pool(
    tables: Iterable[SourceTable],
    *,
    skip_bad: bool,
    progress: Progress | None = None,
    noun: str = "image",
    near_duplicates: bool = True,
) -> tuple[pd.DataFrame, dict, LocalFeatures]:
    """Source tables as the rows a dataset keeps, the one pipeline every set goes through
    (recipes, your own data, `search --external`, `evaluate --data`): every file decoded once
    and checked (`scan_images`), exact copies removed, re-framed copies merged into one row
    and one patient group (`dedupe`, `merge_copies`). Returns (rows, what was rejected,
    removed and merged, the rows' keypoints).

    `near_duplicates=False` skips the search for re-framed copies and same-patient films (the
    larger part of the finder's cost): only byte-identical copies are removed, each patient is
    its own split group, and `near_duplicate_search` is recorded as false. The keypoints are
    still computed and kept, so external sets are still checked against the rows."""
    tables = list(tables)
    pool = pd.concat([t.table for t in tables], ignore_index=True)
    if pool.empty:
        raise DataError("the sources hold no images")
    t0 = time.perf_counter()
    scan = scan_images(pool, skip_bad=skip_bad, progress=progress, noun=noun)
    t1 = time.perf_counter()
    table, features, dup_info = dedupe(scan)
    n_before = len(table)
    finder: dict[str, float] = {}
    if near_duplicates:
        table, features, near, copy_conflicts = merge_copies(table, features, timings=finder)
    else:
        near, copy_conflicts = [], []
        table = table.assign(group_id=table["patient_id"].astype(str))
    t2 = time.perf_counter()
    dup_info["label_conflicts"] = dup_info["label_conflicts"] + copy_conflicts
    dup_info["copies_removed"] = (
        n_before - len(table) - sum(len(c["paths"]) for c in copy_conflicts)
    )
    merged = sorted(
        {g for g, n in table.groupby("group_id")["patient_id"].nunique().items() if n > 1}
    )
    info = {
        "rejected": scan.rejected,
        **dup_info,
        "near_duplicates": near,
        "near_duplicate_search": near_duplicates,
        "merged_patient_groups": merged,
        "excluded": {t.name: t.excluded for t in tables if t.excluded},
        "decode_notes": {p: n for p, n in zip(table["path"], table["notes"], strict=True) if n},
        # wall seconds of this run's stages (benchmarks/scale.py): decoding, checks and the
        # duplicate finder's keypoints; exact-duplicate removal and the finder's shortlist and
        # geometric verification, then the finder's own split (shortlist_s, verify_s, pairs
        # verified and skipped as implied by copies; pairs_cached when read back)
        "timings": {
            "scan_s": round(t1 - t0, 2),
            "duplicates_s": round(t2 - t1, 2),
            **{f"finder_{k}": v for k, v in finder.items()},
        },
    }
    return table.assign(_feature_row=np.arange(len(table))), info, features
