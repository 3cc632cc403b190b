"""Turn source tables into prepared datasets: the pool scanned and de-duplicated once (`_scan.py`),
sites grouped, each recipe assembled from the pool and written with its manifest."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from automl_cxr.data._dataset import (
    MANIFEST_COLUMNS,
    NEAR_DUPLICATES_FILE,
    canonical_order,
    manifest_hash,
    row_order_digest,
)
from automl_cxr.data._duplicates import FEATURES_FILE, UnionFind
from automl_cxr.data._keypoints import LocalFeatures, Progress
from automl_cxr.data._recipes import PAPER_RECIPES, Recipe, get_recipe
from automl_cxr.data._scan import scan_pool
from automl_cxr.data._sources import SourceTable, read_cohen, read_kermany, read_nih
from automl_cxr.errors import DataError

__all__ = [
    "MANIFEST_COLUMNS",
    "NEW_RECIPES",
    "default_recipes",
    "manifest_hash",
    "patients_at_several_sites",
    "excluded_images",
    "prepare_recipes",
    "prepare_table",
    "site_groups",
]


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
    union = UnionFind(np.unique(s).tolist())
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
    """Write `<data_dir>/<name>/{manifest.csv,dataset.json,near_duplicates.json}` atomically
    (old one kept on error); the finder's pairs go to their own file (`NEAR_DUPLICATES_FILE`), so
    a search's processes do not each hold them (at 50,000 films: 66 MB of JSON, ~230 MB parsed).

    Rows are written in canonical order, so the same content always has the same row order;
    the image cache kept from an earlier version is keyed by that order (see
    `PreparedDataset.cache_path`), files of other contents or orders are removed."""
    manifest = canonical_order(manifest)
    rows_features = features.take(manifest["_feature_row"].to_numpy())
    manifest = manifest[MANIFEST_COLUMNS]
    near = meta.get("near_duplicates") or []
    meta = {
        **{k: v for k, v in meta.items() if k != "near_duplicates"},
        "near_duplicate_pairs": len(near),
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
        (tmp / NEAR_DUPLICATES_FILE).write_text(json.dumps(near, indent=1, default=str))
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
    near_duplicates: bool = True,
) -> list[Path]:
    """Build the recipes from the public sources; returns the dataset folders.

    Without `recipes`: the paper's three, plus `binary_adult` and `four_class_mixed` when the
    NIH folder is given. Adding sources never changes what the paper's recipes draw (their
    pool keys name the source), so their manifests and hashes stay the same.

    `exclude`: folders (one sub-folder per class) or CSV manifests of images kept out of every
    recipe, e.g. a test or external set built from the same sources; an image matches by its
    bytes (sha256), and every other image of a matched patient (split group) goes too, so no
    patient is on both sides.

    `near_duplicates=False`: only byte-identical copies are removed (see `scan_pool`).
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
    pool, info, features = scan_pool(
        tables, skip_bad=skip_bad, progress=progress, near_duplicates=near_duplicates
    )
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
            # the pool keys whose targets --count set (its shortfalls are the user's to hear)
            "counted": sorted({k for c in counts or {} if (k := recipe.count_key(c))}),
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
    from automl_cxr.data._folders import read_csv_manifest, read_folder

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
    near_duplicates: bool = True,
) -> Path:
    """A user's own data (folder per class or CSV manifest) as a prepared dataset
    (`min_classes=1` for an evaluation-only set, e.g. external normals;
    `near_duplicates=False`: only byte-identical copies are removed, see `scan_pool`)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise DataError(f"dataset name must be letters, digits, '_' or '-', but got name={name!r}")
    pool, info, features = scan_pool(
        [table], skip_bad=skip_bad, progress=progress, near_duplicates=near_duplicates
    )
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
