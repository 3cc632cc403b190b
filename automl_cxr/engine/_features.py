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
import json
import os
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

try:
    import fcntl
except ImportError:  # Windows: no cross-process lock; entries may be computed twice
    fcntl = None

from automl_cxr.errors import ConfigError

__all__ = [
    "FEATURE_CACHE_VERSION",
    "FeatureCache",
    "FrozenInputs",
    "feature_key",
    "frozen_inputs",
    "state_hash",
]

FEATURE_CACHE_VERSION = 2


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
        directory: optional folder for `.pt` files shared by processes and later runs; an
            entry read from (or written to) it is memory-mapped, not copied into the process.
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
        return key in self._mem or bool(self.directory and (self.directory / f"{key}.pt").is_file())

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor for `key` (CPU), from memory or disk, or None (counts a hit)."""
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                self.hits += 1
                return self._mem[key]
        path = self.directory / f"{key}.pt" if self.directory else None
        if path is not None and path.is_file():
            try:
                t = _load_mapped(path)
            except Exception as exc:  # torch.load raises many kinds on a torn file
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
        self, key: str, compute: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, bool]:
        """The cached tensor for `key` (CPU), computing and storing it on a miss.

        Returns (tensor, hit).
        """
        t = self.get(key)
        if t is not None:
            return t, True
        with self._file_lock(key):  # another process may be computing it: wait, then load
            t = self.get(key)
            if t is not None:
                return t, True
            return self._compute(key, compute), False

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

    def _compute(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        path = self.directory / f"{key}.pt" if self.directory else None
        t = compute().detach().to("cpu").contiguous()
        self.misses += 1
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=key, suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                torch.save(t, tmp)
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
            with contextlib.suppress(Exception):  # keep the computed copy if it cannot be mapped
                t = _load_mapped(path)  # the page cache's copy, shared with the other workers
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
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


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
        pair, hit = cache.get_or_compute(key, lambda: run.pooled(share_from))
        from automl_cxr.models import combine_pooled

        x = combine_pooled(pair, pool).to(device)  # on the CPU a view of the cached entry
        net, kind = classifier, "pooled"
    else:
        parts = key_parts(depth, split[0])
        key = feature_key(**parts)
        feats, hit = cache.get_or_compute(key, lambda: run.features(depth, share_from))
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
                feats, _ = self.cache.get_or_compute(key, lambda: self.features(share_from, None))
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

    def _gather(self, batches) -> torch.Tensor:
        """The batches' rows in one tensor filled as they come (a list of batches joined at
        the end held every feature twice: 1.2 GB more at the peak for a 50,000-image entry)."""
        out: torch.Tensor | None = None
        i = 0
        for b in batches:
            if out is None:
                out = torch.empty((len(self.images), *b.shape[1:]), dtype=b.dtype, device=b.device)
            out[i : i + len(b)] = b
            i += len(b)
        if out is None or i != len(out):
            raise RuntimeError(f"computed features for {i} of {len(self.images)} images")
        return out

    def features(self, depth: int, share_from: int | None) -> torch.Tensor:
        return self._gather(self._chunks(depth, share_from))

    def pooled(self, share_from: int | None) -> torch.Tensor:
        """(N, 2, C): the avg- and max-pooled vectors of the last stage's output."""
        from automl_cxr.models import pool_vectors

        neck = self.model.neck

        def batches():
            for fb in self._chunks(self.model.num_stages, share_from, itself=True):
                avg, mx = pool_vectors(neck(fb))
                yield torch.stack([avg, mx], dim=1)

        return self._gather(batches())
