"""DICOM radiographs in (pydicom + pylibjpeg): decoded into the same 8-bit gray array as PNG or
JPEG files, with the display pipeline a PACS viewer applies.

1. Only projection radiographs are accepted: ``Modality`` CR or DX (or absent); CT, MR, US,
   secondary captures and others are rejected with the reason, as are lateral views
   (``ViewPosition`` LL/RL/LAT…) and multi-frame objects.
2. Pixel data is decoded by pydicom, compressed transfer syntaxes (JPEG baseline/lossless,
   JPEG-LS, JPEG 2000, RLE) through the pylibjpeg plugins.
3. The modality LUT (``RescaleSlope``/``RescaleIntercept`` or a Modality LUT Sequence), then
   the VOI LUT (a VOI LUT Sequence, else the first ``WindowCenter``/``WindowWidth``) when the
   file has one — pydicom's ``apply_modality_lut`` / ``apply_voi_lut``.
4. The result is scaled to 0..255 by its real range (so 12-bit data in 16-bit words is not
   crushed to black), and ``PhotometricInterpretation`` MONOCHROME1 (white = low values) is
   inverted so bone is always bright.

``PatientID`` (else ``StudyInstanceUID``) of each file becomes its split group when a source
table is built (:func:`dicom_split_groups`), so a patient's files never straddle folds.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from automl_cxr.errors import ImageDecodeError, MissingDependency

__all__ = [
    "DICOM_SUFFIXES",
    "RADIOGRAPH_MODALITIES",
    "decode_dicom",
    "dicom_header",
    "dicom_split_groups",
    "is_dicom",
    "is_dicom_bytes",
]

DICOM_SUFFIXES = {".dcm", ".dicom"}
RADIOGRAPH_MODALITIES = ("CR", "DX")
_LATERAL = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}


def is_dicom_bytes(path: str | Path, data: bytes) -> bool:
    """A DICOM Part 10 file: the ``DICM`` magic after the 128-byte preamble, or a ``.dcm``
    / ``.dicom`` name."""
    return data[128:132] == b"DICM" or Path(path).suffix.lower() in DICOM_SUFFIXES


def is_dicom(path: str | Path) -> bool:
    """`path` is a DICOM file (by suffix, or an extension-less file with the DICM magic)."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    if p.suffix or not p.is_file():
        return False
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise MissingDependency("pydicom", "dicom", "reading DICOM files") from None
    return pydicom


def _check_radiograph(ds: Any) -> str | None:
    """The reason a dataset is not a frontal projection radiograph, or None."""
    modality = str(getattr(ds, "Modality", "") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return (
            f"modality {modality} is not a projection radiograph "
            f"(allowed: {', '.join(RADIOGRAPH_MODALITIES)})"
        )
    view = str(getattr(ds, "ViewPosition", "") or "").upper().strip()
    if view in _LATERAL:
        return f"lateral view (ViewPosition {view}): the models are trained on frontal views"
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame object ({frames} frames), not a single radiograph"
    return None


def decode_dicom(path: str | Path, data: bytes) -> tuple[np.ndarray, str, list[str]]:
    """(8-bit gray pixels, mode description, notes) of a DICOM radiograph's bytes.

    Raises ImageDecodeError with the reason (not DICOM, no pixel data, missing decoder,
    not a radiograph, lateral view, ...).
    """
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise ImageDecodeError(path, f"not a valid DICOM file ({exc})") from None
    except Exception as exc:  # truncated headers raise many kinds
        raise ImageDecodeError(
            path, f"unreadable DICOM file ({type(exc).__name__}: {exc})"
        ) from None
    why = _check_radiograph(ds)
    if why:
        raise ImageDecodeError(path, why)
    if "PixelData" not in ds:
        raise ImageDecodeError(path, "DICOM file has no pixel data")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing plugin, damaged fragments, short pixel data
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        name = getattr(syntax, "name", syntax)
        raise ImageDecodeError(path, f"cannot decode DICOM pixel data ({name}): {msg}") from None
    notes: list[str] = []
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (RGB / YBR after pydicom's conversion)
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        notes.append(f"{photometric} converted to gray")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        notes.append("modality LUT applied")
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        notes.append("VOI LUT / window applied")
    lo, hi = float(values.min()), float(values.max())
    out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        out = 255.0 - out
        notes.append("MONOCHROME1 inverted")
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    if bits > 8:
        notes.append(f"{bits}-bit rescaled by its real range")
    mode = f"{photometric} {bits}-bit" + (f" {getattr(syntax, 'name', syntax)}" if syntax else "")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mode, notes


def dicom_header(path: str | Path) -> dict[str, str]:
    """PatientID, StudyInstanceUID, Modality and ViewPosition of a DICOM file (header only;
    empty strings where absent or unreadable)."""
    pydicom = _pydicom()
    keys = ("PatientID", "StudyInstanceUID", "Modality", "ViewPosition")
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=list(keys))
    except Exception:
        return dict.fromkeys(keys, "")
    return {k: str(getattr(ds, k, "") or "").strip() for k in keys}


def dicom_split_groups(table: Any, *, keep_given: bool = False) -> Any:
    """A source table whose DICOM rows take their ``patient_id`` from the file: PatientID,
    else StudyInstanceUID (prefixed by the source), and their ``view`` from ViewPosition.
    With `keep_given` (the user supplied patient ids) only the view is filled in."""
    if table is None or len(table) == 0 or "path" not in table:
        return table
    mask = [is_dicom(p) for p in table["path"]]
    if not any(mask):
        return table
    table = table.copy()
    for i in np.flatnonzero(mask):
        idx = table.index[i]
        h = dicom_header(table.at[idx, "path"])
        if not keep_given:
            key = h["PatientID"] or h["StudyInstanceUID"]
            if key:
                src = str(table.at[idx, "source"]) if "source" in table else "dicom"
                table.at[idx, "patient_id"] = f"{src}:{key}"
        if "view" in table and not str(table.at[idx, "view"] or "") and h["ViewPosition"]:
            table.at[idx, "view"] = h["ViewPosition"]
    return table
