"""Frozen-feature cache: the frozen stages' output, computed once and reused across trials.

When the first N stages of a backbone are frozen (eval mode, BatchNorm included) and no
augmentation comes before them, their output on an image is the same in every epoch, fold
and trial. It is keyed by everything that determines it (`frozen_key_parts`): backbone, N, the
weights (the checkpoint's sha256, or a hash of the frozen prefix's initial state when there is
no checksum), the input normalisation (gray mode, mean, std), resolution, compute dtype and
device type, the image cache version, the timm and torch versions and the dataset's content
hash.

`frozen_inputs` decides what a trial trains on, cheapest first:

- every stage frozen and a pooling head: the pooled vectors (avg and max, (N, 2, C)), so only
  the classifier trains — milliseconds per epoch;
- N stages frozen: the feature map after stage N, computed from the deepest shallower depth
  already cached (or from `share_from`'s, computed and cached first), not from pixels, so the
  frozen prefix common to the depths a search draws runs once per backbone;
- otherwise (nothing frozen, augmentation, a backbone that cannot be cut) the images.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    import fcntl
except ImportError:  # Windows: no cross-process lock; entries may be computed twice
    fcntl = None

from automl_cxr.data import save_npy_rows_atomic
from automl_cxr.errors import ConfigError

__all__ = [
    "FEATURE_CACHE_VERSION",
    "FeatureCache",
    "FrozenInputs",
    "feature_key",
    "frozen_inputs",
    "state_hash",
]

FEATURE_CACHE_VERSION = 3
"""3: entries are `.npy` files written batch by batch as they are computed (2: `.pt` files of
a tensor built whole in memory first)."""


def feature_key(**parts: object) -> str:
    """A stable short hash of the parts that determine the cached features."""
    blob = json.dumps({"v": FEATURE_CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def state_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's state_dict: every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """In-memory LRU of feature tensors within a byte budget, optionally backed by a folder.

    Args:
        max_bytes: memory budget; least recently used entries are evicted beyond it. An entry
            larger than the budget is not kept in memory (but still written to disk).
        directory: optional folder for `.npy` files shared by processes and later runs; an
            entry is written to it batch by batch as it is computed, and read back (or read
            from it later) memory-mapped, not copied into the process.
    """

    def __init__(self, max_bytes: int = 4 << 30, directory: str | Path | None = None) -> None:
        if max_bytes < 0:
            raise ConfigError(f"max_bytes must be at least 0, but got max_bytes={max_bytes}")
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.discarded: list[str] = []  # damaged files deleted and recomputed, with the reason

    @property
    def bytes_used(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._mem.values())

    def __contains__(self, key: str) -> bool:
        return key in self._mem or bool(self.directory and self._path(key).is_file())

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.npy"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor for `key` (CPU), from memory or disk, or None (counts a hit)."""
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                self.hits += 1
                return self._mem[key]
        path = self._path(key) if self.directory else None
        if path is not None and path.is_file():
            try:
                t = _load_mapped(path)
            except Exception as exc:  # np.load raises many kinds on a torn file
                # a torn or damaged file: recomputed, and said (the trial's feature_cache
                # record lists it), never silently
                path.unlink(missing_ok=True)
                why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                self.discarded.append(f"{path.name}: {type(exc).__name__}: {why}")
                warnings.warn(
                    f"feature cache file {path} was damaged ({type(exc).__name__}); recomputing it",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
            self._remember(key, t)
            self.hits += 1
            return t
        return None

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], torch.Tensor | Iterable[torch.Tensor]],
        *,
        rows: int | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """The cached tensor for `key` (CPU), computing and storing it on a miss.

        `compute()` returns the tensor, or (given its `rows`) its consecutive row batches: with
        a folder they are written to the entry's file as they come, so the entry is never
        whole in this process's memory (0.6 GB per worker for a 50,000-image feature map).
        Returns (tensor, hit).
        """
        t = self.get(key)
        if t is not None:
            return t, True
        with self._file_lock(key):  # another process may be computing it: wait, then load
            t = self.get(key)
            if t is not None:
                return t, True
            return self._compute(key, compute, rows), False

    @contextlib.contextmanager
    def _file_lock(self, key: str):
        """An exclusive lock on `<key>.lock` in the folder (none without a folder or fcntl),
        so worker processes sharing the folder compute each entry once."""
        if self.directory is None or fcntl is None:
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"{key}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _compute(
        self,
        key: str,
        compute: Callable[[], torch.Tensor | Iterable[torch.Tensor]],
        rows: int | None,
    ) -> torch.Tensor:
        out = compute()
        if isinstance(out, torch.Tensor):
            out, rows = [out], len(out)
        elif rows is None:
            raise ConfigError("rows must be given when compute() returns batches, but got None")
        batches = (b.detach().to("cpu") for b in out)
        first = next(batches, None)
        if first is None:
            raise RuntimeError(f"computed no batch of the {rows} rows of entry {key}")
        batches = itertools.chain([first], batches)
        self.misses += 1
        if self.directory is None:
            t = _gather(batches, rows)
        else:
            path = self._path(key)
            shape = (rows, *first.shape[1:])
            dtype = first.numpy().dtype
            save_npy_rows_atomic(path, shape, dtype, (b.numpy() for b in batches))
            try:
                t = _load_mapped(path)  # the page cache's copy, shared with the other workers
            except Exception:  # a folder that cannot be mapped: read it in
                t = torch.from_numpy(np.load(path))
        self._remember(key, t)
        return t

    def _remember(self, key: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            self._mem[key] = t
            self._mem.move_to_end(key)
            while self.bytes_used > self.max_bytes:
                self._mem.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()


def _load_mapped(path: Path) -> torch.Tensor:
    """A cache file's tensor, memory-mapped (read-only use, copy-on-write): worker processes
    reading the same entry share one copy in the page cache instead of each holding its own,
    so the features of a large dataset cost their size once, not once per worker."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _gather(batches: Iterable[torch.Tensor], rows: int) -> torch.Tensor:
    """The batches' `rows` rows in one tensor filled as they come (a list of batches joined
    at the end held every feature twice: 1.2 GB more at the peak for a 50,000-image entry)."""
    out: torch.Tensor | None = None
    i = 0
    for b in batches:
        if out is None:
            out = torch.empty((rows, *b.shape[1:]), dtype=b.dtype)
        if i + len(b) > rows:
            raise RuntimeError(f"computed more than the {rows} rows asked for")
        out[i : i + len(b)] = b
        i += len(b)
    if out is None or i != rows:
        raise RuntimeError(f"computed features for {i} of {rows} rows")
    return out


@dataclass
class FrozenInputs:
    """What a trial trains on: `x` (rows aligned with the dataset, on the device) fed to `net`
    (the modules holding every trainable parameter; `net(x[i])` are the logits), and how the
    cache served it (`info`: used, hit, key, key_parts, bytes, seconds, kind, from_depth)."""

    x: torch.Tensor
    net: nn.Module
    info: dict = field(default_factory=dict)


def frozen_inputs(
    model: nn.Module,
    images: torch.Tensor,
    prep: Callable[[torch.Tensor], torch.Tensor],
    key_parts: Callable[[int, nn.Module], dict],
    cache: FeatureCache,
    *,
    batch_size: int,
    autocast: Callable[[], object],
    share_from: int | None = None,
) -> FrozenInputs | None:
    """Cached frozen features for `model` (a `CxrModel`) on `images` (N, 1, R, R uint8 on the
    device; `prep` scales a batch of them), or None when the model cannot be split.

    `key_parts(depth, prefix)` gives the key parts of the features after `depth` stages
    (`prefix` maps images to them). `share_from` is the shallowest depth the caller's search
    draws for this backbone: features there are cached on the way to a deeper depth.
    """
    split = model.split_frozen()
    if split is None:
        return None
    t0 = time.perf_counter()
    depth = model.frozen_stages
    pooled = model.pooled_head()
    device = images.device
    run = _Runner(model, images, prep, key_parts, cache, batch_size, autocast)
    if pooled is not None:
        pool, classifier = pooled
        parts = {**key_parts(depth, split[0]), "pool": "avg+max"}
        key = feature_key(**parts)
        pair, hit = cache.get_or_compute(key, lambda: run.pooled(share_from), rows=len(images))
        from automl_cxr.models import combine_pooled

        x = combine_pooled(pair, pool).to(device)  # on the CPU a view of the cached entry
        net, kind = classifier, "pooled"
    else:
        parts = key_parts(depth, split[0])
        key = feature_key(**parts)
        feats, hit = cache.get_or_compute(
            key, lambda: run.features(depth, share_from), rows=len(images)
        )
        x, net, kind = feats.to(device), split[1], "feature_map"
    info = {
        "used": True,
        "hit": hit,
        **({"discarded_files": list(cache.discarded)} if cache.discarded else {}),
        "kind": kind,
        "key": key,
        "key_parts": {k: v for k, v in parts.items() if k not in ("mean", "std")},
        "bytes": int(x.numel() * x.element_size()),
        "from_depth": None if hit else run.from_depth,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return FrozenInputs(x, net, info)


class _Runner:
    """Computes frozen features, starting from the deepest cached depth it can."""

    def __init__(self, model, images, prep, key_parts, cache, batch_size, autocast) -> None:
        self.model, self.images, self.prep = model, images, prep
        self.key_parts, self.cache = key_parts, cache
        self.batch_size, self.autocast = batch_size, autocast
        self.from_depth: int | None = None  # where the last computation started (0 = pixels)

    def _key(self, depth: int) -> str | None:
        prefix = self.model.frozen_part(0, depth)
        return None if prefix is None else feature_key(**self.key_parts(depth, prefix))

    def _start(
        self, depth: int, share_from: int | None, *, itself: bool
    ) -> tuple[int, torch.Tensor | None]:
        """(start depth, its cached features or None for pixels) for computing `depth`; with
        `itself`, `depth`'s own cached features count (the pooled vectors are computed from
        them)."""
        for j in range(depth if itself else depth - 1, 0, -1):
            cut = j == depth or self.model.frozen_part(j, depth) is not None
            key = self._key(j) if cut else None
            feats = self.cache.get(key) if key is not None else None
            if feats is not None:
                return j, feats
        if share_from is not None and 0 < share_from < depth:
            key = self._key(share_from)
            if key is not None and self.model.frozen_part(share_from, depth) is not None:
                feats, _ = self.cache.get_or_compute(
                    key, lambda: self.features(share_from, None), rows=len(self.images)
                )
                return share_from, feats
        return 0, None

    def _chunks(self, depth: int, share_from: int | None, *, itself: bool = False):
        """The features after `depth` stages, one evaluation batch at a time."""
        start, source = self._start(depth, share_from, itself=itself)
        self.from_depth = start
        part = nn.Identity() if start == depth else self.model.frozen_part(start, depth)
        part.eval()
        n = len(self.images)
        device = self.images.device
        with torch.inference_mode(), self.autocast():
            for i in range(0, n, self.batch_size):
                if source is None:
                    xb = self.prep(self.images[i : i + self.batch_size])
                else:
                    xb = source[i : i + self.batch_size].to(device)
                yield part(xb).float()

    def features(self, depth: int, share_from: int | None) -> Iterable[torch.Tensor]:
        """The features after `depth` stages, batch by batch (for `FeatureCache`)."""
        return self._chunks(depth, share_from)

    def pooled(self, share_from: int | None) -> Iterable[torch.Tensor]:
        """(N, 2, C) batch by batch: the avg- and max-pooled vectors of the last stage's
        output."""
        from automl_cxr.models import pool_vectors

        neck = self.model.neck
        with torch.inference_mode():
            for fb in self._chunks(self.model.num_stages, share_from, itself=True):
                avg, mx = pool_vectors(neck(fb))
                yield torch.stack([avg, mx], dim=1)
