"""Preprocessed images of a dataset (the `roi`/`intensity` levers), computed once per image
and cached beside its decoded images, keyed by the dataset, its row order, the levers, the
segmenter's hash and the resolution."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automl_cxr.data import CACHE_VERSION, save_npy_atomic
from automl_cxr.lungs._preprocess import CANVAS, Preprocess, PreprocessSpec
from automl_cxr.lungs._unet import Segmenter, load_segmenter

__all__ = [
    "DEFAULT_SEGMENTER",
    "STUDY_SEGMENTERS",
    "study_segmenter",
    "PreprocessedImages",
    "preprocess_for",
    "preprocess_record",
    "rebuild_preprocess",
    "preprocess_canvas",
    "preprocessed_images",
    "segmenter_path",
]

DEFAULT_SEGMENTER = Path("lungs") / "segmenter.pt"
"""Where `automl-cxr lungs train` writes the segmenter, relative to the data folder."""


STUDY_SEGMENTERS = "segmenters"
"""Folder of a study's artifact folder that keeps a copy of each lung segmenter it searched
with (`<artifacts>/segmenters/lungs-<sha256[:16]>.pt`), so that a trial can be retrained
with its own segmenter after `lungs train` has written another (training is not
bit-reproducible)."""


def study_segmenter(artifacts: str | Path, key: str) -> Path:
    """Where a study's artifact folder keeps the segmenter `key` (``lungs:<hash>``)."""
    return Path(artifacts) / STUDY_SEGMENTERS / f"{key.replace(':', '-')}.pt"


def segmenter_path(train_config: Any, data_dir: str | Path) -> Path:
    """The trial's segmenter checkpoint: its `segmenter`, else `<data_dir>/lungs/segmenter.pt`."""
    given = getattr(train_config, "segmenter", None)
    return Path(given) if given else Path(data_dir) / DEFAULT_SEGMENTER


def preprocess_for(
    train_config: Any, data_dir: str | Path, resolution: int | None = None
) -> tuple[PreprocessSpec, Preprocess | None]:
    """(spec, module) of a training configuration; module None for the identity levers."""
    spec = PreprocessSpec(train_config.roi, train_config.intensity)
    if spec.identity:
        return spec, None
    seg: Segmenter | None = None
    if spec.needs_segmenter:
        seg = load_segmenter(segmenter_path(train_config, data_dir))
        spec = PreprocessSpec(spec.roi, spec.intensity, seg.key)
    module = Preprocess(spec, resolution or train_config.resolution, seg).eval()
    return spec, module


def preprocess_record(spec: PreprocessSpec, module: Preprocess, resolution: int) -> dict:
    """What an exported model's config.json says about its first layer (enough to rebuild it
    with `rebuild_preprocess`)."""
    seg = module.seg
    return {
        "roi": spec.roi,
        "intensity": spec.intensity,
        "key": spec.key(),
        "canvas": CANVAS,
        "resolution": int(resolution),
        "segmenter": None
        if seg is None
        else {"encoder": seg.encoder_name, "size": module.seg_size, "key": spec.segmenter},
        "input": f"the radiograph resized square to {CANVAS} px (aspect not kept), gray in [0, 1]",
    }


def rebuild_preprocess(record: dict) -> Preprocess:
    """An untrained copy of an exported model's preprocessing (its weights come with the
    model's state dict)."""
    from automl_cxr.lungs._unet import LungUNet

    spec = PreprocessSpec(
        record["roi"], record["intensity"], (record.get("segmenter") or {}).get("key")
    )
    seg = None
    if record.get("segmenter"):
        s = record["segmenter"]
        seg = Segmenter(LungUNet.for_weights(s["encoder"]), int(s["size"]), "", "", {})
    return Preprocess(spec, int(record["resolution"]), seg).eval()


@torch.inference_mode()
def segment_canvas(module: Preprocess, canvas: np.ndarray, batch: int = 32) -> np.ndarray:
    """The segmenter's masks (N, s, s) bool of (N, CANVAS, CANVAS) uint8 images."""
    s = module.seg_size
    out = np.empty((len(canvas), s, s), dtype=bool)
    for i in range(0, len(canvas), batch):
        x = torch.from_numpy(np.array(canvas[i : i + batch])).float().div_(255.0).unsqueeze(1)
        out[i : i + batch] = module.segment(x).squeeze(1).numpy()
    return out


@torch.inference_mode()
def preprocess_canvas(
    module: Preprocess, canvas: np.ndarray, batch: int = 32, masks: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run `module` over (N, CANVAS, CANVAS) uint8 images: (N, R, R) uint8 and (N,) lungs
    found; `masks` are `segment_canvas`'s output when already known (bit-identical result)."""
    r = module.resolution
    out = np.empty((len(canvas), r, r), dtype=np.uint8)
    ok = np.empty(len(canvas), dtype=bool)
    for i in range(0, len(canvas), batch):
        x = torch.from_numpy(np.array(canvas[i : i + batch])).float().div_(255.0).unsqueeze(1)
        small = None if masks is None else torch.from_numpy(np.array(masks[i : i + batch]))
        y, found = module.forward_status(x, None if small is None else small.unsqueeze(1))
        out[i : i + batch] = torch.round(y * 255.0).squeeze(1).to(torch.uint8).numpy()
        ok[i : i + batch] = found.numpy()
    return out, ok


class PreprocessedImages:
    """(images, found) of a dataset for one preprocessing: `images` (N, R, R) uint8 as
    `dataset.images(R)` gives them, `found` whether the lungs were found (False rows fell back
    to `full`)."""

    def __init__(self, images: np.ndarray, found: np.ndarray, key: str) -> None:
        self.images, self.found, self.key = images, found, key

    @property
    def fallbacks(self) -> int:
        return int((~self.found).sum())


def _cached_npy(
    path: Path, shape: tuple[int, ...], compute: Callable[[], np.ndarray]
) -> np.ndarray:
    """The array saved at `path` if it has `shape`, else `compute()`, saved there atomically."""
    try:
        arr = np.load(path)
        if arr.shape == shape:
            return arr
    except (OSError, ValueError):
        pass
    arr = compute()
    save_npy_atomic(path, arr)
    return arr


_MEMO: dict[tuple[str, str], PreprocessedImages] = {}


def preprocessed_images(
    dataset: Any, spec: PreprocessSpec, module: Preprocess
) -> PreprocessedImages:
    """The dataset's images through `module`, computed once and cached on disk (memory-mapped
    read-only, shared by worker processes)."""
    r = module.resolution
    root = Path(dataset.root) / "cache"
    stem = f"{dataset.hash}_{dataset.row_digest[:16]}_v{CACHE_VERSION}_{spec.key()}_{r}px"
    memo = (str(root), stem)
    if memo in _MEMO:
        return _MEMO[memo]
    n = len(dataset)
    img_path, ok_path = root / f"{stem}.npy", root / f"{stem}.found.npy"
    try:
        images = np.load(img_path, mmap_mode="r")
        found = np.load(ok_path)
        if images.shape != (n, r, r) or found.shape != (n,):
            raise ValueError("shape")
    except (OSError, ValueError):
        canvas = dataset.images(CANVAS)
        masks = None
        if module.seg is not None:  # the segmentation is shared by every roi and intensity
            s = module.seg_size
            mstem = f"{dataset.hash}_{dataset.row_digest[:16]}_v{CACHE_VERSION}_{spec.segmenter}"
            masks = _cached_npy(
                root / f"{mstem}_c{CANVAS}_s{s}.lungmask.npy",
                (n, s, s),
                lambda: segment_canvas(module, canvas),
            )
        images, found = preprocess_canvas(module, canvas, masks=masks)
        save_npy_atomic(ok_path, found)
        save_npy_atomic(img_path, images)
        images = np.load(img_path, mmap_mode="r")
    out = PreprocessedImages(images, found.astype(bool), spec.key())
    _MEMO[memo] = out
    return out
