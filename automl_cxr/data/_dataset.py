"""A prepared dataset: its manifest, metadata and (cached) pixels."""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from automl_cxr.data._image import decode_gray, resize_square
from automl_cxr.errors import DataError

__all__ = ["CACHE_VERSION", "PreparedDataset", "list_datasets", "load_dataset"]

CACHE_VERSION = 1  # bump when decoding or resizing changes: old cache files are then ignored

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
        """A view on some rows (e.g. a quick-run sample) sharing this dataset's image cache."""
        import hashlib

        idx = np.asarray(indices, dtype=np.int64)
        manifest = self.manifest.iloc[idx].reset_index(drop=True)
        sub_hash = hashlib.sha256(f"{self.hash}:{tag}:{idx.tolist()}".encode()).hexdigest()
        meta = {**self.meta, "manifest_hash": sub_hash, "subset_of": self.hash, "subset": tag}
        meta["classes"] = {k: int(v) for k, v in manifest["label"].value_counts().items()}
        parent = self

        class _Subset(PreparedDataset):
            def images(self, size: int, *, progress=None) -> np.ndarray:
                if size not in self._images:
                    self._images[size] = np.asarray(parent.images(size, progress=progress))[idx]
                return self._images[size]

        return _Subset(self.root, manifest, meta)

    def cache_path(self, size: int) -> Path:
        return self.root / "cache" / f"{self.hash[:16]}_v{CACHE_VERSION}_{size}px.npy"

    def images(self, size: int, *, progress=None) -> np.ndarray:
        """All images as a (N, size, size) uint8 array, decoded once and cached on disk.

        The cache is keyed by the manifest's content hash, the size and CACHE_VERSION; the
        file is memory-mapped read-only, so several trial processes share the page cache.
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
        arr = self._decode_all(size, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, arr)
            os.replace(tmp, path)  # atomic: concurrent workers never read half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._images[size] = np.load(path, mmap_mode="r")
        return self._images[size]

    def _decode_all(self, size: int, *, progress=None) -> np.ndarray:
        paths = self.manifest["path"].tolist()
        out = np.empty((len(paths), size, size), dtype=np.uint8)

        def one(i: int) -> int:
            out[i] = resize_square(decode_gray(paths[i], min_side=1).pixels, size)
            return i

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
            for k, _ in enumerate(ex.map(one, range(len(paths)))):
                if progress:
                    progress(k + 1, len(paths))
        return out


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
        manifest = pd.read_csv(
            root / "manifest.csv", dtype={"patient_id": str, "group_id": str}, keep_default_na=False
        )
    except (OSError, ValueError) as exc:
        raise DataError(
            f"dataset {name!r} at {root} is damaged ({exc}); prepare it again"
        ) from None
    if manifest.empty:
        raise DataError(f"dataset {name!r} at {root} has no images. {_PREPARE_HINT}.")
    return PreparedDataset(root, manifest, meta)
