"""DICOM out: the Grad-CAM overlay of a DICOM input as a Secondary Capture (RGB) in the same
patient and study, so it opens beside the original in a PACS viewer."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from automl_cxr.errors import MissingDependency

__all__ = ["SECONDARY_CAPTURE", "write_secondary_capture"]

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
_COPIED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def write_secondary_capture(
    source: str | Path, overlay: np.ndarray, out: str | Path, *, description: str
) -> Path:
    """Write `overlay` ((H, W, 3) uint8 RGB) as a Secondary Capture of DICOM file `source`:
    same patient and study, a new series, derived-image type and a description of what the
    colours mean. Returns the path written."""
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    except ImportError:
        raise MissingDependency("pydicom", "dicom", "writing DICOM Secondary Captures") from None
    src = pydicom.dcmread(str(source), stop_before_pixels=True)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for key in _COPIED:
        if key in src:
            setattr(ds, key, src.data_element(key).value)
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = generate_uid()
    now = _dt.datetime.now()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9901
    ds.InstanceNumber = 1
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = "automl-cxr Grad-CAM (research only)"
    ds.DerivationDescription = description[:1024]
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.BurnedInAnnotation = "NO"
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = src.get("SOPClassUID", "")
    ref.ReferencedSOPInstanceUID = src.get("SOPInstanceUID", "")
    ds.SourceImageSequence = [ref]
    rgb = np.ascontiguousarray(overlay, dtype=np.uint8)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    path = Path(out)
    ds.save_as(path, enforce_file_format=True)
    return path
