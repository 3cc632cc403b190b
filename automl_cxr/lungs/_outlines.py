"""V7 Labs' lung outlines for Cohen images (Darwin JSON in a zip) as binary masks."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from automl_cxr.data import decode_gray, resize_square
from automl_cxr.errors import DataError

__all__ = ["LungOutlines", "read_outlines"]


@dataclass
class LungOutlines:
    """Cohen images with both lungs outlined: (N, S, S) uint8 images, (N, S, S) bool masks,
    and per row the file name, patient id and acquisition site (for site-held-out checks)."""

    images: np.ndarray
    masks: np.ndarray
    names: list[str]
    patients: np.ndarray
    sites: np.ndarray
    skipped: dict[str, int]
    shas: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def drop(self, keep: np.ndarray, why: str) -> LungOutlines:
        """The rows where `keep` is True; the others are counted under `why`."""
        skipped = dict(self.skipped)
        if (~keep).any():
            skipped[why] = int((~keep).sum())
        idx = np.flatnonzero(keep)
        return LungOutlines(
            self.images[idx],
            self.masks[idx],
            [self.names[i] for i in idx],
            self.patients[idx],
            self.sites[idx],
            skipped,
            [self.shas[i] for i in idx],
        )


def _polygons(doc: dict) -> list[list[tuple[float, float]]]:
    out = []
    for a in doc.get("annotations", []):
        if a.get("name") != "Lung" or "polygon" not in a:
            continue
        path = a["polygon"].get("path") or []
        if len(path) >= 3:
            out.append([(float(p["x"]), float(p["y"])) for p in path])
    return out


def _mask(polys, width: int, height: int, w: int, h: int) -> np.ndarray:
    """Rasterise polygons drawn on a (width x height) original onto our (w x h) copy."""
    sx, sy = w / float(width), h / float(height)
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for poly in polys:
        draw.polygon([(x * sx, y * sy) for x, y in poly], fill=1)
    return np.asarray(img, dtype=bool)


def read_outlines(zip_path: str | Path, cohen_root: str | Path, *, size: int) -> LungOutlines:
    """Every outlined Cohen image with two lung polygons whose file is in `cohen_root`, decoded
    and resized square to `size` with its mask (polygons scaled from the size V7 drew on)."""
    from automl_cxr.data import read_cohen

    zip_path, cohen_root = Path(zip_path), Path(cohen_root)
    if not zip_path.is_file():
        raise DataError(
            f"lung outlines not found at {zip_path}: expected V7 Labs' covid-only.zip "
            "(see shared/data/README.md, lungmasks/)"
        )
    table = read_cohen(cohen_root).table
    by_name = {Path(p).name: row for p, row in zip(table["path"], table.itertuples(), strict=True)}
    images, masks, names, patients, sites, shas = [], [], [], [], [], []
    skipped = {"not in the Cohen folder": 0, "fewer than two lungs": 0}
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{zip_path} is not a readable zip file ({exc})") from None
    with zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if not info.filename.endswith(".json"):
                continue
            doc = json.loads(zf.read(info))
            meta = doc.get("image", {})
            name = str(meta.get("original_filename", ""))
            row = by_name.get(name)
            if row is None:
                skipped["not in the Cohen folder"] += 1
                continue
            polys = _polygons(doc)
            if len(polys) < 2:
                skipped["fewer than two lungs"] += 1
                continue
            decoded = decode_gray(row.path, min_side=1)
            px = decoded.pixels
            shas.append(decoded.sha256)
            h, w = px.shape
            m = _mask(polys, int(meta["width"]), int(meta["height"]), w, h)
            images.append(resize_square(px, size))
            masks.append(resize_square(m.astype(np.uint8) * 255, size) >= 128)
            names.append(name)
            patients.append(row.patient_id)
            sites.append(row.site or "cohen:unknown")
    if not names:
        raise DataError(f"no outline in {zip_path} matches an image in {cohen_root}")
    return LungOutlines(
        images=np.stack(images),
        masks=np.stack(masks),
        names=names,
        patients=np.asarray(patients, dtype=object).astype(str),
        sites=np.asarray(sites, dtype=object).astype(str),
        skipped={k: v for k, v in skipped.items() if v},
        shas=shas,
    )
