"""Decode any radiograph file into an 8-bit grayscale array, or say precisely why not."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from automl_cxr.data._dicom import decode_dicom, is_dicom_bytes
from automl_cxr.errors import ImageDecodeError

__all__ = ["MIN_SIDE", "DecodedImage", "decode_gray", "resize_square"]

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image

MIN_SIDE = 64
"""Images whose shorter side is below this many pixels are rejected (not a radiograph)."""

_EXT_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".gif": "GIF",
    ".webp": "WEBP",
}


@dataclass(frozen=True)
class DecodedImage:
    """An 8-bit grayscale radiograph with what was learned while decoding it."""

    pixels: np.ndarray  # (H, W) uint8
    sha256: str  # of the file's bytes
    format: str  # the real format (from the bytes, not the extension)
    mode: str  # the original Pillow mode
    notes: tuple[str, ...] = ()  # e.g. "extension .png but JPEG bytes", "16-bit rescaled"

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def _to_gray(img: Image.Image, notes: list[str]) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth: rescale by the real value range, so 12-bit data stored in 16-bit
        # containers is not crushed to black by a fixed /257.
        arr = np.asarray(img).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        notes.append(f"{mode} rescaled from [{lo:g}, {hi:g}] to [0, 255]")
        if hi <= lo:
            return np.zeros(arr.shape, dtype=np.uint8)
        return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels carry no film: composite over black (the background of a radiograph).
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        notes.append("alpha composited over black")
        return np.asarray(Image.alpha_composite(black, rgba).convert("L"), dtype=np.uint8)
    if mode == "CMYK":
        notes.append("CMYK converted through RGB")
        return np.asarray(img.convert("RGB").convert("L"), dtype=np.uint8)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    # RGB, P, YCbCr, LAB, HSV ...
    return np.asarray(img.convert("RGB").convert("L"), dtype=np.uint8)


def decode_gray(path: str | Path, *, min_side: int = MIN_SIDE) -> DecodedImage:
    """Decode `path` fully into an 8-bit grayscale array.

    Raises ImageDecodeError naming the file and the reason (empty, not an image, truncated,
    too small, ...). The real format is read from the bytes; a lying extension is noted, not fatal.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot open file ({exc.strerror or exc})") from None
    if not data:
        raise ImageDecodeError(path, "file is empty (0 bytes)")
    notes: list[str] = []
    if is_dicom_bytes(path, data):  # DICOM: the display pipeline of data/_dicom.py
        pixels, mode, notes = decode_dicom(path, data)
        return _checked(path, data, pixels, "DICOM", mode, notes, min_side)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = img.format or "unknown"
            mode = img.mode
            pixels = _to_gray(img, notes)
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            msg = f"file is truncated or incomplete ({msg})"
        raise ImageDecodeError(path, msg) from None
    expected = _EXT_FORMATS.get(path.suffix.lower())
    if expected and expected != fmt:
        notes.append(f"extension {path.suffix} but {fmt} bytes")
    return _checked(path, data, pixels, fmt, mode, notes, min_side)


def _checked(
    path: Path, data: bytes, pixels: np.ndarray, fmt: str, mode: str, notes: list, min_side: int
) -> DecodedImage:
    h, w = pixels.shape[:2]
    if min(h, w) < min_side:
        raise ImageDecodeError(
            path, f"image is {w}x{h} px, too small to be a radiograph (minimum side {min_side} px)"
        )
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels),
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        mode=mode,
        notes=tuple(notes),
    )


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a (H, W) uint8 image to (size, size) with antialiasing (aspect is not kept,
    as in the paper's 224x224 inputs)."""
    if pixels.shape == (size, size):
        return pixels
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))
