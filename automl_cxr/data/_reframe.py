"""Re-framed copies of a radiograph: what a film looks like after a paper, a website or another
collection has republished it. Used to measure (and test) the duplicate finder's recall.

Each copy gets a random mix of the edits listed in `REFRAMINGS` (the ranges of issue 28): a
crop of up to 25 % per side, padding of up to 10 % (black or white), an aspect change of up to
1.25, a rotation of up to ±5°, a resize so the longer side is 256–1024 px, a gamma of 0.7–1.4
or histogram equalisation, JPEG quality 50–95, and a burned-in text label or arrow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["REFRAMINGS", "Reframed", "reframe", "encode"]

REFRAMINGS = {
    "crop": "crop 0-25 % of each side (independently)",
    "pad": "pad 0-10 % of each side, black or white",
    "aspect": "stretch one axis by 1.0-1.25",
    "rotate": "rotate by -5..5 degrees (black corners)",
    "resize": "longer side to 256-1024 px",
    "intensity": "gamma 0.7-1.4, or histogram equalisation",
    "jpeg": "encode as JPEG at quality 50-95 (else PNG)",
    "mark": "burn in a text label or an arrow",
}
"""Every edit a copy may get; `crop` and `resize` always apply, the others each with
probability 0.6."""

_P = 0.6
_TEXTS = ("L", "R", "PA", "AP", "PORTABLE", "SUPINE", "Fig. 2", "Day 4", "A", "B")


@dataclass
class Reframed:
    """A re-framed copy: its pixels, encoded bytes and the edits it got."""

    pixels: np.ndarray  # (H, W) uint8, as encoded (JPEG artefacts included)
    data: bytes
    suffix: str  # ".jpg" or ".png"
    edits: dict[str, Any] = field(default_factory=dict)


def encode(pixels: np.ndarray, *, jpeg_quality: int | None) -> tuple[bytes, str]:
    """PNG (lossless) or JPEG bytes of an 8-bit gray image."""
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    if jpeg_quality is None:
        img.save(buf, format="PNG")
        return buf.getvalue(), ".png"
    img.save(buf, format="JPEG", quality=int(jpeg_quality))
    return buf.getvalue(), ".jpg"


def reframe(pixels: np.ndarray, rng: np.random.Generator) -> Reframed:
    """A random re-framed copy of `pixels` ((H, W) uint8)."""
    import cv2

    img = np.ascontiguousarray(pixels, dtype=np.uint8)
    edits: dict[str, Any] = {}
    h, w = img.shape
    frac = rng.uniform(0.0, 0.25, size=4)  # top, bottom, left, right
    t, b = int(frac[0] * h), int(frac[1] * h)
    left, r = int(frac[2] * w), int(frac[3] * w)
    img = img[t : h - b, left : w - r]
    edits["crop"] = [round(float(f), 3) for f in frac]
    if rng.random() < _P:
        deg = float(rng.uniform(-5.0, 5.0))
        hh, ww = img.shape
        m = cv2.getRotationMatrix2D((ww / 2.0, hh / 2.0), deg, 1.0)
        img = cv2.warpAffine(img, m, (ww, hh), flags=cv2.INTER_LINEAR, borderValue=0)
        edits["rotate"] = round(deg, 2)
    if rng.random() < _P:
        s = float(rng.uniform(1.0, 1.25))
        hh, ww = img.shape
        axis = int(rng.integers(2))
        size = (int(ww * s), hh) if axis == 1 else (ww, int(hh * s))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        edits["aspect"] = {"axis": "x" if axis == 1 else "y", "factor": round(s, 3)}
    if rng.random() < _P:
        pad = rng.uniform(0.0, 0.10, size=4)
        hh, ww = img.shape
        value = int(rng.choice([0, 255]))
        pt, pb, pl, pr = (int(pad[0] * hh), int(pad[1] * hh), int(pad[2] * ww), int(pad[3] * ww))
        img = cv2.copyMakeBorder(img, pt, pb, pl, pr, cv2.BORDER_CONSTANT, value=value)
        edits["pad"] = {"sides": [round(float(p), 3) for p in pad], "value": value}
    longer = int(rng.integers(256, 1025))
    hh, ww = img.shape
    scale = longer / max(hh, ww)
    size = (max(1, round(ww * scale)), max(1, round(hh * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    img = cv2.resize(img, size, interpolation=interp)
    edits["resize"] = longer
    if rng.random() < _P:
        if rng.random() < 0.5:
            img = cv2.equalizeHist(img)
            edits["intensity"] = "equalize"
        else:
            g = float(rng.uniform(0.7, 1.4))
            lut = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** g), 0, 255)
            img = lut.astype(np.uint8)[img]
            edits["intensity"] = {"gamma": round(g, 3)}
    if rng.random() < _P:
        img = img.copy()
        hh, ww = img.shape
        colour = int(rng.choice([0, 255]))
        if rng.random() < 0.5:
            text = str(rng.choice(_TEXTS))
            scale_f = max(ww, hh) / 400.0
            org = (int(rng.uniform(0.02, 0.6) * ww), int(rng.uniform(0.08, 0.95) * hh))
            cv2.putText(
                img,
                text,
                org,
                cv2.FONT_HERSHEY_SIMPLEX,
                scale_f,
                colour,
                max(1, int(2 * scale_f)),
                cv2.LINE_AA,
            )
            edits["mark"] = {"text": text}
        else:
            x0, y0 = int(rng.uniform(0.1, 0.9) * ww), int(rng.uniform(0.1, 0.9) * hh)
            ang = rng.uniform(0, 2 * np.pi)
            length = 0.12 * max(ww, hh)
            x1, y1 = int(x0 + length * np.cos(ang)), int(y0 + length * np.sin(ang))
            cv2.arrowedLine(img, (x1, y1), (x0, y0), colour, max(2, ww // 150), tipLength=0.3)
            edits["mark"] = "arrow"
    quality = int(rng.integers(50, 96)) if rng.random() < _P else None
    if quality is not None:
        edits["jpeg"] = quality
    data, suffix = encode(img, jpeg_quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    return Reframed(decoded, data, suffix, edits)
