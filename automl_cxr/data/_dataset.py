"""A prepared dataset: its manifest, metadata and (cached) pixels."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from automl_cxr.data._image import decode_gray, resize_square
from automl_cxr.data._sources import COLUMNS
from automl_cxr.errors import DataError

__all__ = [
    "NEAR_DUPLICATES_FILE",
    "MANIFEST_COLUMNS",
    "CACHE_VERSION",
    "PreparedDataset",
    "canonical_order",
    "list_datasets",
    "load_dataset",
    "manifest_hash",
    "row_order_digest",
    "mapped_copy_on_write",
    "save_npy_atomic",
    "save_npy_rows_atomic",
    "save_npz_atomic",
]

CACHE_VERSION = 2
"""Bump when decoding, resizing or the cache layout changes: old cache files are then ignored.
2: files are keyed by the row order too (version 1 caches, keyed by the order-free content
hash only, could hand back another row's pixels after the rows were reordered)."""
NEAR_DUPLICATES_FILE = "near_duplicates.json"
"""A prepared dataset's duplicate-finder pairs (`PreparedDataset.near_duplicates`)."""


def save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """`np.save` to `path` through a temporary file in its folder (created if missing) and an
    atomic rename: concurrent workers never read half a file."""
    _write_atomic(path, lambda fh: np.save(fh, arr))


def save_npy_rows_atomic(
    path: Path, shape: tuple[int, ...], dtype: np.dtype | type, chunks: Iterable[np.ndarray]
) -> None:
    """An `.npy` of `shape` written from `chunks` (consecutive rows, in order) as they come,
    atomically like `save_npy_atomic`: only one chunk is ever in memory, where building the
    array first held all of it (820 MB of 128 px images at 50,000 films)."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}

    def write(fh) -> None:
        np.lib.format.write_array_header_1_0(fh, header)
        rows = 0
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            if chunk.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"a chunk of shape {chunk.shape} does not fit rows of {shape}")
            fh.write(chunk.data)
            rows += len(chunk)
        if rows != shape[0]:
            raise ValueError(f"the chunks held {rows} rows, but shape={shape} needs {shape[0]}")

    _write_atomic(path, write)


def mapped_copy_on_write(arr: np.ndarray) -> np.ndarray:
    """`arr`, writable, without a private copy when it is a whole `.npy` memory-mapped
    read-only (the image caches): the file mapped again copy-on-write, so the processes of a
    search read its one copy in the page cache and a write stays private (never reaches the
    file). Any other array (a slice of a mapping, an in-memory array) is copied."""
    name = getattr(arr, "filename", None)
    if isinstance(arr, np.memmap) and name and arr.flags.c_contiguous:
        with contextlib.suppress(OSError, ValueError):
            cow = np.load(name, mmap_mode="c")
            # same shape, dtype and contiguous: the view spans the whole file, not a slice
            if cow.shape == arr.shape and cow.dtype == arr.dtype:
                return cow
    return np.array(arr)


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """`np.savez` to `path`, atomically like `save_npy_atomic`."""
    _write_atomic(path, lambda fh: np.savez(fh, **arrays))


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def canonical_order(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's rows in the one order every dataset is written and loaded in: by image
    bytes (`sha256`), then `path`."""
    return manifest.sort_values(["sha256", "path"], kind="stable").reset_index(drop=True)


def row_order_digest(manifest: pd.DataFrame) -> str:
    """A hash of the row order (the sha256 column in order): the image cache's second key."""
    return hashlib.sha256("\n".join(manifest["sha256"].astype(str)).encode()).hexdigest()


def manifest_hash(manifest: pd.DataFrame) -> str:
    """Content hash of a manifest: image bytes, label and split group of every row.

    The hash itself is order-free; every manifest is written (and loaded) in one canonical row
    order (`canonical_order`: by sha256, then path), so one hash means one row order."""
    lines = sorted(
        f"{s}\t{lab}\t{g}"
        for s, lab, g in zip(
            manifest["sha256"], manifest["label"], manifest["group_id"], strict=True
        )
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _with_demographics(manifest: pd.DataFrame) -> pd.DataFrame:
    """Typed age/sex/age_group/site columns; a manifest written before they existed gets
    unknown ages and sexes, Kermany's rows `child`, and its source as each row's site."""
    from automl_cxr.data._sources import fill_demographics

    legacy_group = "age_group" not in manifest
    m = fill_demographics(manifest)
    if legacy_group:
        m.loc[m["source"] == "kermany", "age_group"] = "child"
    return m


_PREPARE_HINT = (
    "Prepare it with `automl-cxr data prepare --sources DIR` (the paper's datasets from the "
    "public Cohen/Kermany sources), or `automl-cxr data prepare --folder DIR --name NAME` "
    "for your own folder-per-class data"
)


@dataclass
class PreparedDataset:
    """A dataset folder written by `data prepare` (`manifest.csv` + `dataset.json`)."""

    root: Path
    manifest: pd.DataFrame
    meta: dict
    _images: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def near_duplicates(self) -> list[dict]:
        """The duplicate finder's pairs in this dataset's pool (copies merged, patients joined),
        read from `NEAR_DUPLICATES_FILE` when asked (datasets prepared before it: from
        dataset.json)."""
        path = self.root / NEAR_DUPLICATES_FILE
        if path.is_file():
            return list(json.loads(path.read_text()))
        old = json.loads((self.root / "dataset.json").read_text())
        return list(old.get("near_duplicates") or [])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def positive(self) -> str | None:
        return self.meta.get("positive")

    @property
    def hash(self) -> str:
        return str(self.meta["manifest_hash"])

    @cached_property
    def labels(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return self.manifest["label"].map(index).to_numpy(dtype=np.int64)

    @cached_property
    def groups(self) -> np.ndarray:
        """Split groups: patients, merged where the same radiograph appears under two ids."""
        return self.manifest["group_id"].astype(str).to_numpy()

    def __len__(self) -> int:
        return len(self.manifest)

    def subset(self, indices, *, tag: str) -> PreparedDataset:
        """A view on some rows (e.g. a quick-run sample) sharing this dataset's image cache.

        Its hash covers the parent's hash and the row positions in their order, so two subsets
        are the same dataset exactly when they hold the same rows in the same order."""
        idx = np.asarray(indices, dtype=np.int64)
        manifest = self.manifest.iloc[idx].reset_index(drop=True)
        sub_hash = hashlib.sha256(f"{self.hash}:{tag}:{idx.tolist()}".encode()).hexdigest()
        root = self.meta.get("subset_of") or self.hash  # the prepared dataset on disk
        meta = {**self.meta, "manifest_hash": sub_hash, "subset_of": root, "subset": tag}
        meta["classes"] = {k: int(v) for k, v in manifest["label"].value_counts().items()}
        parent = self

        class _Subset(PreparedDataset):
            def images(self, size: int, *, progress=None) -> np.ndarray:
                if size not in self._images:
                    self._images[size] = np.asarray(parent.images(size, progress=progress))[idx]
                return self._images[size]

            def local_features(self, *, progress=None):
                return parent.local_features(progress=progress).take(idx)

        return _Subset(self.root, manifest, meta)

    @cached_property
    def row_digest(self) -> str:
        """Hash of this manifest's row order (see `row_order_digest`)."""
        return row_order_digest(self.manifest)

    def cache_path(self, size: int) -> Path:
        """`cache/<content hash>_<row order>_v<CACHE_VERSION>_<size>px.npy`."""
        name = f"{self.hash[:16]}_{self.row_digest[:16]}_v{CACHE_VERSION}_{size}px.npy"
        return self.root / "cache" / name

    def images(self, size: int, *, progress=None) -> np.ndarray:
        """All images as a (N, size, size) uint8 array, decoded once and cached on disk.

        The cache is keyed by the manifest's content hash, its row order, the size and
        CACHE_VERSION, so a cache written for the same images in another order is never read
        back; the file is memory-mapped read-only, so trial processes share the page cache.
        """
        if size < 16:
            raise DataError(f"image size must be at least 16 px, but got size={size}")
        if size in self._images:
            return self._images[size]
        path = self.cache_path(size)
        if path.is_file():
            try:
                arr = np.load(path, mmap_mode="r")
                if arr.shape == (len(self), size, size) and arr.dtype == np.uint8:
                    self._images[size] = arr
                    return arr
            except (OSError, ValueError):
                pass  # a torn or foreign file: rebuild it
        save_npy_rows_atomic(
            path, (len(self), size, size), np.uint8, self._decode_all(size, progress=progress)
        )
        self._images[size] = np.load(path, mmap_mode="r")
        return self._images[size]

    def local_features(self, *, progress=None):
        """The duplicate finder's keypoints of every row (`data/_duplicates.py`): those `data
        prepare` saved, or computed from the files once and saved beside the manifest."""
        from automl_cxr.data._dupcache import features_of_files
        from automl_cxr.data._duplicates import FEATURES_FILE
        from automl_cxr.data._keypoints import LocalFeatures

        keys = self.manifest["sha256"].astype(str).tolist()
        path = self.root / FEATURES_FILE
        feats = LocalFeatures.load(path, keys) if path.is_file() else None
        if feats is None:
            feats = features_of_files(self.manifest["path"].tolist(), progress=progress)
            with contextlib.suppress(OSError):  # a read-only dataset folder: computed again
                feats.save(path, keys)
        return feats

    def _decode_all(self, size: int, *, progress=None, chunk: int = 1024):
        """Every row's pixels at `size`, `chunk` rows at a time (decoded by a few threads)."""
        paths = self.manifest["path"].tolist()

        def one(i: int) -> np.ndarray:
            return resize_square(decode_gray(paths[i], min_side=1).pixels, size)

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
            for start in range(0, len(paths), chunk):
                out = np.empty((min(chunk, len(paths) - start), size, size), dtype=np.uint8)
                for k, img in enumerate(ex.map(one, range(start, start + len(out)))):
                    out[k] = img
                    if progress:
                        progress(start + k + 1, len(paths))
                yield out


_ADDED_AT_PREPARE = {"patient_id": ("group_id",), "license": ("sha256", "width", "height")}
MANIFEST_COLUMNS = [c for col in COLUMNS for c in (col, *_ADDED_AT_PREPARE.get(col, ()))]
"""Manifest columns: a source table's columns (`data._sources.COLUMNS`, written once there)
with what `data prepare` adds after its patient id (`group_id`: patients joined by duplicates)
and license (`sha256`, `width`, `height`). `age` is in years (blank: unknown), `sex`
M/F/blank, `age_group` adult/child/blank (Kermany's children have no age per image, but are
children), `site` the acquisition site (distinct across sources: `nih`, `kermany`,
`cohen:<location>`)."""
_NUMERIC_COLUMNS = ("width", "height", "age")
_TEXT_COLUMNS = {c: str for c in MANIFEST_COLUMNS if c not in _NUMERIC_COLUMNS}


def list_datasets(data_dir: str | Path) -> list[str]:
    d = Path(data_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / "dataset.json").is_file())


def load_dataset(name: str, data_dir: str | Path) -> PreparedDataset:
    """Load a prepared dataset by name; a clear error lists the ones that exist."""
    data_dir = Path(data_dir)
    root = data_dir / name
    if not (root / "dataset.json").is_file():
        have = list_datasets(data_dir)
        where = f"prepared datasets in {data_dir}: {have}" if have else f"{data_dir} holds none"
        raise DataError(f"unknown dataset {name!r} ({where}). {_PREPARE_HINT}.")
    try:
        meta = json.loads((root / "dataset.json").read_text())
        meta.pop("near_duplicates", None)  # older datasets: read on demand (`near_duplicates`)
        manifest = pd.read_csv(root / "manifest.csv", dtype=_TEXT_COLUMNS, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"dataset {name!r} at {root} is damaged ({exc}); prepare it again"
        ) from None
    if manifest.empty:
        raise DataError(f"dataset {name!r} at {root} has no images. {_PREPARE_HINT}.")
    if "sha256" in manifest:
        # Written by an older version in another order (or edited by hand): the canonical
        # order makes one manifest hash mean one row order for every cache keyed by it.
        manifest = canonical_order(manifest)
    if {"sha256", "label", "group_id"} <= set(manifest.columns) and "manifest_hash" in meta:
        # Image and feature caches are keyed by the recorded hash: rows edited by hand would
        # be served another row's pixels or features.
        found = manifest_hash(manifest)
        if found != meta["manifest_hash"]:
            raise DataError(
                f"dataset {name!r} at {root}: manifest.csv does not match the manifest_hash "
                f"recorded in dataset.json ({meta['manifest_hash'][:12]}…, rows hash to "
                f"{found[:12]}…): it was edited after `data prepare`, and the cached images "
                "and features keyed by that hash would no longer line up with its rows. "
                "Prepare it again (or exclude rows with `data prepare --exclude`)"
            )
    return PreparedDataset(root, _with_demographics(manifest), meta)
