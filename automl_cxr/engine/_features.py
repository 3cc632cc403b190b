"""Frozen-feature cache: the frozen stages' output, computed once and reused across trials.

When the first N stages of a backbone are frozen (eval mode, BatchNorm included) and no
augmentation comes before them, their output on an image is the same in every epoch, fold
and trial. It is keyed by everything that determines it (`feature_key` of the parts
`_trial._Session` gives): backbone, N, the weights (the checkpoint's sha256, or a hash of
the frozen prefix's initial state when there is no checksum), the input normalisation (gray
mode, mean, std), resolution, compute dtype and device type, the image cache version, the
timm and torch versions and the dataset's content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from automl_cxr.errors import ConfigError

__all__ = ["FEATURE_CACHE_VERSION", "FeatureCache", "feature_key", "state_hash"]

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
        directory: optional folder for `.pt` files shared by processes and later runs.
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

    @property
    def bytes_used(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._mem.values())

    def __contains__(self, key: str) -> bool:
        return key in self._mem or bool(self.directory and (self.directory / f"{key}.pt").is_file())

    def get_or_compute(
        self, key: str, compute: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, bool]:
        """The cached tensor for `key` (CPU), computing and storing it on a miss.

        Returns (tensor, hit).
        """
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                self.hits += 1
                return self._mem[key], True
        path = self.directory / f"{key}.pt" if self.directory else None
        if path is not None and path.is_file():
            try:
                t = torch.load(path, map_location="cpu", weights_only=True)
                self._remember(key, t)
                self.hits += 1
                return t, True
            except (OSError, RuntimeError, EOFError):
                path.unlink(missing_ok=True)  # torn file: recompute
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
        self._remember(key, t)
        return t, False

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
