"""DICOM radiographs in (pydicom + pylibjpeg): decoded into the same 8-bit gray array as PNG or
JPEG files, with the display pipeline a PACS viewer applies.

1. Only projection radiographs are accepted: ``Modality`` CR or DX (or absent); CT, MR, US,
   secondary captures and others are rejected with the reason, as are lateral views
   (``ViewPosition`` LL/RL/LAT…) and multi-frame objects.
2. Pixel data is decoded by pydicom, compressed transfer syntaxes (JPEG baseline/lossless,
   JPEG-LS, JPEG 2000, RLE) through the pylibjpeg plugins.
3. The modality LUT (``RescaleSlope``/``RescaleIntercept`` or a Modality LUT Sequence), then
   the VOI LUT (a VOI LUT Sequence, else the first ``WindowCenter``/``WindowWidth``) when the
   file has one, then the Presentation LUT (``PresentationLUTShape`` INVERSE or a sequence) —
   pydicom's ``apply_modality_lut`` / ``apply_voi_lut`` / ``apply_presentation_lut``. A colour
   file with a window is rejected (a window is defined for one gray channel).
4. The result is scaled to 0..255 by its real range (so 12-bit data in 16-bit words is not
   crushed to black) with ``PixelPaddingValue`` pixels left out of the range and shown black,
   and ``PhotometricInterpretation`` MONOCHROME1 (white = low values) is inverted so bone is
   always bright — once, whether or not the file also says ``PresentationLUTShape`` INVERSE.

``PatientID`` of each file becomes its split group when a source table is built
(:func:`dicom_split_groups`), so a patient's files never straddle folds. A file without one
is refused unless patient ids are given in a CSV manifest: ``StudyInstanceUID`` would make
each study its own group and split a patient's studies across folds.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from automl_cxr.errors import DataError, ImageDecodeError, MissingDependency

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


def _padding_mask(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    """Pixels holding ``PixelPaddingValue`` (up to ``PixelPaddingRangeLimit`` when given), in
    stored values before any LUT: the area outside the exposed field, which must not set the
    contrast. None when the file declares no padding or no pixel holds it."""
    if "PixelPaddingValue" not in ds or arr.ndim != 2:
        return None
    a = int(ds.PixelPaddingValue)
    b = int(getattr(ds, "PixelPaddingRangeLimit", a))
    mask = (arr >= min(a, b)) & (arr <= max(a, b))
    return mask if mask.any() else None


def decode_dicom(path: str | Path, data: bytes) -> tuple[np.ndarray, str, list[str]]:
    """(8-bit gray pixels, mode description, notes) of a DICOM radiograph's bytes.

    Raises ImageDecodeError with the reason (not DICOM, no pixel data, missing decoder,
    not a radiograph, lateral view, ...).
    """
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_presentation_lut, apply_voi_lut

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
    windowed = "VOILUTSequence" in ds or "WindowCenter" in ds
    if arr.ndim == 3:  # colour (RGB / YBR after pydicom's conversion)
        if windowed:
            raise ImageDecodeError(
                path,
                f"colour DICOM ({photometric}) with a VOI LUT / window: a window is defined "
                "for one gray channel, so the display this file asks for is undefined "
                "(allowed: MONOCHROME1/2 with or without a window, colour without one)",
            )
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        notes.append(f"{photometric} converted to gray")
    padding = _padding_mask(arr, ds)
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        notes.append("modality LUT applied")
    if windowed:
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        notes.append("VOI LUT / window applied")
    shape = str(getattr(ds, "PresentationLUTShape", "") or "").strip().upper()
    if "PresentationLUTSequence" in ds or shape in ("IDENTITY", "INVERSE"):
        # P-values: the display the file asks for. INVERSE is the same inversion that
        # MONOCHROME1 implies (PS3.3 C.8.11.6.1.2 pairs them), so it is applied once.
        values = np.asarray(apply_presentation_lut(values, ds), dtype=np.float64)
        if shape == "INVERSE":
            notes.append("Presentation LUT INVERSE applied")
        elif "PresentationLUTSequence" in ds:
            notes.append("Presentation LUT applied")
        invert = False
    else:
        invert = photometric == "MONOCHROME1"
    real = values[~padding] if padding is not None else values
    lo, hi = (float(real.min()), float(real.max())) if real.size else (0.0, 0.0)
    out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    if invert:
        out = 255.0 - out
        notes.append("MONOCHROME1 inverted")
    if padding is not None:
        out[padding] = 0.0
        notes.append(f"{int(padding.sum())} padding pixel(s) left out of the scaling, shown black")
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
    """A source table whose DICOM rows take their ``patient_id`` from the file's PatientID
    (prefixed by the source) and their ``view`` from ViewPosition. With `keep_given` (the user
    supplied patient ids) only the view is filled in.

    Raises DataError naming the files when a DICOM file has no PatientID and no id was given.
    """
    if table is None or len(table) == 0 or "path" not in table:
        return table
    mask = [is_dicom(p) for p in table["path"]]
    if not any(mask):
        return table
    table = table.copy()
    anonymous: list[str] = []
    for i in np.flatnonzero(mask):
        idx = table.index[i]
        h = dicom_header(table.at[idx, "path"])
        if not keep_given:
            if h["PatientID"]:
                src = str(table.at[idx, "source"]) if "source" in table else "dicom"
                table.at[idx, "patient_id"] = f"{src}:{h['PatientID']}"
            else:
                anonymous.append(str(table.at[idx, "path"]))
        if "view" in table and not str(table.at[idx, "view"] or "") and h["ViewPosition"]:
            table.at[idx, "view"] = h["ViewPosition"]
    if anonymous:
        raise DataError(
            f"{len(anonymous)} DICOM file(s) have no PatientID, e.g. {anonymous[:3]}: without "
            "it a patient's films cannot be kept on one side of a split (grouping by "
            "StudyInstanceUID would put each study of one patient in its own group). Give "
            "patient ids in a CSV manifest with columns path,label,patient_id"
        )
    return table
