"""Turn source tables into prepared datasets: decode once, reject, de-duplicate, write manifests."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from automl_cxr.data._dataset import (
    MANIFEST_COLUMNS,
    canonical_order,
    manifest_hash,
    row_order_digest,
)
from automl_cxr.data._duplicates import (
    FEATURES_FILE,
    LocalFeatures,
    features_for,
    find_matches_keyed,
)
from automl_cxr.data._image import MIN_SIDE, decode_gray
from automl_cxr.data._recipes import PAPER_RECIPES, Recipe, get_recipe
from automl_cxr.data._sources import SourceTable, read_cohen, read_kermany, read_nih
from automl_cxr.errors import DataError, ImageDecodeError

__all__ = [
    "MANIFEST_COLUMNS",
    "NEW_RECIPES",
    "ScanResult",
    "default_recipes",
    "manifest_hash",
    "patients_at_several_sites",
    "excluded_images",
    "prepare_recipes",
    "prepare_table",
    "scan_images",
    "site_groups",
]

Progress = Callable[[int, int], None]


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
) -> ScanResult:
    """Decode every image of `pool` once (threads: Pillow releases the GIL while decoding).

    A file that cannot be used raises DataError naming it and the reason, unless `skip_bad`,
    in which case it is left out and listed in `rejected`.
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
            f"{len(rejected)} image(s) cannot be used:\n{lines}{more}\n"
            "Fix or remove them, or pass --skip-bad to leave them out (they are then listed "
            "in the dataset's rejects report)."
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


def _dedupe(scan: ScanResult) -> tuple[pd.DataFrame, LocalFeatures, dict]:
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


class _Union:
    """Union-find over names; a set's representative is its smallest name."""

    def __init__(self, items: Iterable[str]) -> None:
        self.parent = {p: p for p in items}

    def find(self, p: str) -> str:
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _merge_copies(
    table: pd.DataFrame, features: LocalFeatures, progress: Progress | None = None
) -> tuple[pd.DataFrame, LocalFeatures, list[dict], list[dict]]:
    """Run the duplicate finder over the pool (`data/_duplicates.py`).

    A copy (the same radiograph re-framed) becomes one image: the largest copy is kept, the
    others are removed, and all their patients become one split group; copies under two labels
    are a label conflict (all dropped). A same-patient match (a follow-up film) joins the two
    patients' split groups and keeps both images. Returns the table with `group_id`, its
    features, the matches (with evidence and what was done) and the label conflicts."""
    matches = find_matches_keyed(features, table["sha256"].astype(str), progress=progress)
    paths, patients = table["path"].tolist(), table["patient_id"].astype(str).tolist()
    img = _Union(map(str, range(len(table))))
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
    pats = _Union(patients)
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


def _summary(manifest: pd.DataFrame) -> dict:
    per_patient = manifest.groupby("patient_id").size()
    labels_per_patient = manifest.groupby("patient_id")["label"].nunique()
    multi = labels_per_patient[labels_per_patient > 1]
    return {
        "images": len(manifest),
        "classes": {k: int(v) for k, v in manifest["label"].value_counts().sort_index().items()},
        "patients": {
            k: int(v) for k, v in manifest.groupby("label")["patient_id"].nunique().items()
        },
        "sources": {k: int(v) for k, v in manifest["source"].value_counts().sort_index().items()},
        "distinct_patients": int(manifest["patient_id"].nunique()),
        "split_groups": int(manifest["group_id"].nunique()),
        "images_per_patient": {
            "mean": round(float(per_patient.mean()), 3) if len(per_patient) else 0.0,
            "max": int(per_patient.max()) if len(per_patient) else 0,
        },
        "patients_with_several_labels": {
            "count": len(multi),
            "examples": sorted(multi.index)[:10],
        },
        "unlicensed_images": int((manifest["license"].fillna("").str.strip() == "").sum()),
        "sites": {k: int(v) for k, v in manifest["site"].value_counts().sort_index().items()},
        "patients_at_several_sites": patients_at_several_sites(manifest),
    }


def site_groups(
    patients: Sequence[str] | np.ndarray, sites: Sequence[str] | np.ndarray
) -> np.ndarray:
    """One group id per image: its site, with sites that share a patient merged (union-find).

    A patient seen at two sites joins them, so a site-held-out split grouped by this can never
    put one patient on both sides. Group ids are the sorted, ``+``-joined site names of each
    merged set (a site that shares no patient keeps its own name). Pass the split groups
    (`group_id`) as `patients` to keep near-duplicate merges together too.
    """
    p = np.asarray(patients).astype(str)
    s = np.asarray(sites).astype(str)
    union = _Union(np.unique(s).tolist())
    first_site: dict[str, str] = {}
    for pi, si in zip(p.tolist(), s.tolist(), strict=True):
        union.join(first_site.setdefault(pi, si), si)
    members: dict[str, list[str]] = {}
    for x in union.parent:
        members.setdefault(union.find(x), []).append(x)
    name = {root: "+".join(sorted(xs)) for root, xs in members.items()}
    return np.array([name[union.find(x)] for x in s.tolist()], dtype=object)


def patients_at_several_sites(manifest: pd.DataFrame) -> dict:
    """Split groups (patients) whose images carry more than one `site`.

    `site` is per row; a site-held-out split must keep such a group's sites together (merge
    them: `site_groups`), or the patient straddles training and validation."""
    per_group = manifest.groupby("group_id")["site"].unique()
    multi = per_group[per_group.map(len) > 1]
    return {
        "count": len(multi),
        "groups": {str(g): sorted(map(str, s)) for g, s in sorted(multi.items())[:20]},
    }


def _write_dataset(
    data_dir: Path,
    name: str,
    manifest: pd.DataFrame,
    meta: dict,
    classes: Sequence[str],
    features: LocalFeatures,
) -> Path:
    """Write `<data_dir>/<name>/{manifest.csv,dataset.json}` atomically (old one kept on error).

    Rows are written in canonical order, so the same content always has the same row order;
    the image cache kept from an earlier version is keyed by that order (see
    `PreparedDataset.cache_path`), files of other contents or orders are removed."""
    manifest = canonical_order(manifest)
    rows_features = features.take(manifest["_feature_row"].to_numpy())
    manifest = manifest[MANIFEST_COLUMNS]
    meta = {
        **meta,
        "name": name,
        "labels": list(classes),  # class order of the model's outputs
        "manifest_hash": manifest_hash(manifest),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **_summary(manifest),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    final = data_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=data_dir))
    try:
        manifest.to_csv(tmp / "manifest.csv", index=False)
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, default=str))
        rows_features.save(tmp / FEATURES_FILE, manifest["sha256"].astype(str))
        if (final / "cache").is_dir():  # keep the image cache: keyed by content and row order
            shutil.move(str(final / "cache"), tmp / "cache")
            keep = f"{meta['manifest_hash'][:16]}_{row_order_digest(manifest)[:16]}_"
            for old in (tmp / "cache").iterdir():
                if old.name.endswith("px.npy") and not old.name.startswith(keep):
                    old.unlink()
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _finish_pool(
    tables: Iterable[SourceTable], *, skip_bad: bool, progress: Progress | None
) -> tuple[pd.DataFrame, dict, LocalFeatures]:
    tables = list(tables)
    pool = pd.concat([t.table for t in tables], ignore_index=True)
    if pool.empty:
        raise DataError("the sources hold no images")
    t0 = time.perf_counter()
    scan = scan_images(pool, skip_bad=skip_bad, progress=progress)
    t1 = time.perf_counter()
    table, features, dup_info = _dedupe(scan)
    n_before = len(table)
    table, features, near, copy_conflicts = _merge_copies(table, features)
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
        "merged_patient_groups": merged,
        "excluded": {t.name: t.excluded for t in tables if t.excluded},
        "decode_notes": {p: n for p, n in zip(table["path"], table["notes"], strict=True) if n},
        # wall seconds of this run's stages (benchmarks/scale.py): decoding, checks and the
        # duplicate finder's keypoints; exact-duplicate removal and the finder's shortlist and
        # geometric verification
        "timings": {"scan_s": round(t1 - t0, 2), "duplicates_s": round(t2 - t1, 2)},
    }
    return table.assign(_feature_row=np.arange(len(table))), info, features


NEW_RECIPES = ("binary_adult", "four_class_mixed")


def default_recipes(have_nih: bool) -> tuple[str, ...]:
    """The paper's three recipes, and the two de-confounded ones when NIH is given."""
    return PAPER_RECIPES + NEW_RECIPES if have_nih else PAPER_RECIPES


def _pool_info(pool: pd.DataFrame) -> dict:
    """What the whole pool holds: source x label counts, and Cohen's findings with the label
    each was mapped to (COHEN_FINDINGS)."""
    labels = pd.crosstab(pool["source"], pool["label"])
    cohen = pool[pool["source"] == "cohen"]
    findings = {
        f: {"label": str(g["label"].iloc[0]), "images": len(g)}
        for f, g in sorted(cohen.groupby("finding"), key=lambda kv: (-len(kv[1]), kv[0]))
    }
    return {
        "pool_labels": {s: {k: int(v) for k, v in r.items() if v} for s, r in labels.iterrows()},
        "cohen_findings": findings,
    }


def _resolve_counts(recipes: Sequence[Recipe], counts: Mapping[str, int]) -> list[Recipe]:
    """Apply `--count` overrides to each recipe that draws the key; a key no recipe draws is
    an error."""
    used: set[str] = set()
    out = []
    for recipe in recipes:
        relevant = {k: v for k, v in counts.items() if recipe.count_key(k) is not None}
        used |= set(relevant)
        out.append(recipe.with_counts(relevant) if relevant else recipe)
    unused = sorted(set(counts) - used)
    if unused:
        allowed = sorted({k for r in recipes for k in r.pool_keys})
        raise DataError(
            f"count key(s) {unused} name no pool of the recipes {[r.name for r in recipes]}; "
            f"allowed: {allowed} (or their labels, where one source holds them)"
        )
    return out


def prepare_recipes(
    *,
    cohen: str | Path | None,
    kermany: str | Path | None,
    data_dir: str | Path,
    nih: str | Path | None = None,
    recipes: Sequence[str] | None = None,
    counts: Mapping[str, int] | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    progress: Progress | None = None,
    exclude: Sequence[str | Path] = (),
) -> list[Path]:
    """Build the recipes from the public sources; returns the dataset folders.

    Without `recipes`: the paper's three, plus `binary_adult` and `four_class_mixed` when the
    NIH folder is given. Adding sources never changes what the paper's recipes draw (their
    pool keys name the source), so their manifests and hashes stay the same.

    `exclude`: folders (one sub-folder per class) or CSV manifests of images kept out of every
    recipe, e.g. a test or external set built from the same sources; an image matches by its
    bytes (sha256), and every other image of a matched patient (split group) goes too, so no
    patient is on both sides.
    """
    given = {"cohen": cohen, "kermany": kermany, "nih": nih}
    readers = {"cohen": read_cohen, "kermany": read_kermany, "nih": read_nih}
    tables = [readers[k](v) for k, v in given.items() if v is not None]
    if not tables:
        raise DataError("no sources given: pass the Cohen, Kermany and/or NIH folders")
    resolved: list[Recipe] = [
        get_recipe(r) for r in (recipes if recipes else default_recipes(nih is not None))
    ]
    for recipe in resolved:
        lacking = [s for s in recipe.requires if given.get(s) is None]
        if lacking:
            raise DataError(
                f"recipe {recipe.name!r} needs the source(s) {lacking}, which were not given: "
                f"pass --sources DIR holding {'/, '.join(lacking)}/ (or --{lacking[0]} DIR)"
            )
    if counts:
        resolved = _resolve_counts(resolved, counts)
    held = excluded_images(exclude) if exclude else None  # bad --exclude: before any decoding
    pool, info, features = _finish_pool(tables, skip_bad=skip_bad, progress=progress)
    if held is not None:
        pool, info["excluded_sets"] = _exclude(pool, held, exclude)
    info.update(_pool_info(pool))
    out = []
    for recipe in resolved:
        selected, shortfalls = recipe.select(pool, seed=seed)
        empty = [lab for lab in recipe.classes if not (selected["label"] == lab).any()]
        if empty:
            raise DataError(
                f"recipe {recipe.name!r}: no images for class(es) {empty}; check that the "
                "sources hold them (Cohen for covid, Kermany for bacterial/viral/normal)"
            )
        meta = {
            "kind": "recipe",
            "recipe": {
                "name": recipe.name,
                "description": recipe.description,
                "reference": recipe.reference,
                "targets": recipe.targets,
                "classes": {k: dict(v) for k, v in recipe.classes.items()},
                "notes": list(recipe.notes),
                "drawn": {k: int((selected["pool_key"] == k).sum()) for k in recipe.pool_keys},
            },
            "age_filter": recipe.age_filter(pool),
            "positive": recipe.positive,
            "seed": seed,
            "shortfalls": shortfalls,
            "sources_used": {k: str(v) for k, v in given.items() if v is not None},
            **info,
        }
        out.append(
            _write_dataset(
                Path(data_dir), recipe.name, selected, meta, list(recipe.classes), features
            )
        )
    return out


def excluded_images(sets: Sequence[str | Path]) -> tuple[set[str], int]:
    """The sha256 of every image the `--exclude` sets list, and how many they list."""
    from automl_cxr.data._sources import read_csv_manifest, read_folder

    shas: set[str] = set()
    listed = 0
    for s in sets:
        p = Path(s)
        if p.is_dir():
            table = read_folder(p).table
        elif p.is_file() and p.suffix.lower() == ".csv":
            table = read_csv_manifest(p).table
        else:
            raise DataError(
                f"--exclude {p} is neither a folder (one sub-folder per class) nor a CSV manifest"
            )
        listed += len(table)
        for path in table["path"]:
            try:
                shas.add(hashlib.sha256(Path(path).read_bytes()).hexdigest())
            except OSError as exc:
                raise DataError(f"--exclude {p}: cannot read {path}: {exc.strerror}") from None
    return shas, listed


def _exclude(
    pool: pd.DataFrame, held: tuple[set[str], int], sets: Sequence[str | Path]
) -> tuple[pd.DataFrame, dict]:
    """Drop the held-out images (by bytes) and every image of their patients' split groups."""
    shas, listed = held
    hit = pool["sha256"].isin(shas)
    groups = set(pool.loc[hit, "group_id"])
    drop = pool["group_id"].isin(groups)
    summary = {
        "sets": [str(Path(s).resolve()) for s in sets],
        "images_listed": listed,
        "images_matched": int(hit.sum()),
        "images_removed": int(drop.sum()),
        "patients_removed": len(groups),
    }
    return pool[~drop].reset_index(drop=True), summary


def prepare_table(
    table: SourceTable,
    *,
    name: str,
    data_dir: str | Path,
    kind: str,
    origin: str,
    positive: str | None = "covid",
    skip_bad: bool = False,
    progress: Progress | None = None,
    min_classes: int = 2,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """A user's own data (folder per class or CSV manifest) as a prepared dataset
    (`min_classes=1` for an evaluation-only set, e.g. external normals)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise DataError(f"dataset name must be letters, digits, '_' or '-', but got name={name!r}")
    pool, info, features = _finish_pool([table], skip_bad=skip_bad, progress=progress)
    classes = sorted(pool["label"].unique())
    if len(classes) < min_classes:
        raise DataError(
            f"dataset {name!r} needs at least {min_classes} classes, but found {classes} in "
            f"{origin}"
        )
    meta = {
        "kind": kind,
        "origin": origin,
        "positive": positive if positive in classes else None,
        "seed": None,
        "shortfalls": {},
        **info,
        **dict(extra_meta or {}),
    }
    if table.notes:
        meta["notes"] = list(meta.get("notes") or []) + list(table.notes)
    return _write_dataset(Path(data_dir), name, pool, meta, classes, features)
