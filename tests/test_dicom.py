"""DICOM in: files built with pydicom from the shared X-rays (MONOCHROME1 and 2, 12-bit with a
rescale, a window, JPEG baseline and JPEG 2000 compressed, broken ones, a CT and a lateral view)
decode to the expected pixels or are rejected with the reason; PatientID becomes the split
group; `predict` reads them and writes a DICOM Secondary Capture of the Grad-CAM overlay."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from automl_cxr.cli import main  # noqa: E402
from automl_cxr.data import decode_gray  # noqa: E402
from automl_cxr.data._dicom import dicom_split_groups, is_dicom  # noqa: E402
from automl_cxr.data._folders import read_csv_manifest, read_folder  # noqa: E402
from automl_cxr.errors import DataError, ImageDecodeError  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


@pytest.fixture(scope="module")
def xray(shared_data: Path) -> np.ndarray:
    """A real radiograph from the shared data, 8-bit gray, cropped to keep files small."""
    path = sorted((shared_data / "kermany" / "chest_xray" / "test" / "NORMAL").glob("*"))[0]
    return decode_gray(path).pixels[:256, :320].copy()


def _scaled(a: np.ndarray) -> np.ndarray:
    """What the decoder promises: the values scaled to 0..255 by their real range."""
    a = a.astype(np.float64)
    return np.clip(np.rint((a - a.min()) * 255.0 / (a.max() - a.min())), 0, 255).astype(np.uint8)


def _dataset(pixels: np.ndarray, *, bits: int = 8, photometric: str = "MONOCHROME2", **tags):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = tags.pop("PatientID", "P001")
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome2_and_monochrome1(xray: np.ndarray, tmp_path: Path) -> None:
    m2 = decode_gray(_write(_dataset(xray), tmp_path / "m2.dcm"))
    assert m2.format == "DICOM" and np.array_equal(m2.pixels, _scaled(xray))
    m1 = decode_gray(_write(_dataset(255 - xray, photometric="MONOCHROME1"), tmp_path / "m1.dcm"))
    assert np.array_equal(m1.pixels, _scaled(xray))  # inverted: bone bright again
    assert any("MONOCHROME1 inverted" in n for n in m1.notes)


def test_12_bit_with_rescale_scaled_by_its_real_range(xray: np.ndarray, tmp_path: Path) -> None:
    raw = xray.astype(np.uint16) * 16 + 7  # 7..4087 in a 12-bit range
    ds = _dataset(raw, bits=12, RescaleSlope=2, RescaleIntercept=-1024)
    img = decode_gray(_write(ds, tmp_path / "r12.dcm"))
    assert np.array_equal(img.pixels, _scaled(xray))
    assert any("12-bit" in n for n in img.notes) and any("modality LUT" in n for n in img.notes)
    # the naive /16 or /257 would differ: the real range is used
    assert img.pixels.max() == 255 and img.pixels.min() == 0


def test_window_centre_width(xray: np.ndarray, tmp_path: Path) -> None:
    raw = xray.astype(np.uint16) * 16
    c, w = 2000.0, 1600.0
    ds = _dataset(raw, bits=12, WindowCenter=c, WindowWidth=w)
    img = decode_gray(_write(ds, tmp_path / "win.dcm"))
    # DICOM PS3.3 C.11.2.1.2 linear window, then scaled by the real range of the result
    x = raw.astype(np.float64)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 4095.0
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 4095.0, y))
    assert np.abs(img.pixels.astype(int) - _scaled(y).astype(int)).max() <= 1
    assert (img.pixels == 0).mean() > 0.01 and (img.pixels == 255).mean() > 0.01  # clipped


def test_presentation_lut_inverse_decodes_like_the_png(xray: np.ndarray, tmp_path: Path) -> None:
    """A MONOCHROME2 file stored inverted with PresentationLUTShape INVERSE shows bone bright;
    MONOCHROME1 with INVERSE (the pairing DX files use) is inverted once, not twice."""
    inv = _dataset(255 - xray, PresentationLUTShape="INVERSE")
    img = decode_gray(_write(inv, tmp_path / "inverse.dcm"))
    assert np.array_equal(img.pixels, _scaled(xray))
    assert any("Presentation LUT INVERSE" in n for n in img.notes)
    m1 = _dataset(255 - xray, photometric="MONOCHROME1", PresentationLUTShape="INVERSE")
    assert np.array_equal(decode_gray(_write(m1, tmp_path / "m1inv.dcm")).pixels, _scaled(xray))
    ident = _dataset(xray, PresentationLUTShape="IDENTITY")
    assert np.array_equal(decode_gray(_write(ident, tmp_path / "id.dcm")).pixels, _scaled(xray))


def test_pixel_padding_left_out_of_the_scaling(xray: np.ndarray, tmp_path: Path) -> None:
    """Padding (here 0 around a 12-bit image whose real values start at 1000) does not set
    the contrast: the exposed field scales as without padding, the padding is black."""
    raw = xray.astype(np.uint16) * 8 + 1000
    padded = raw.copy()
    padded[:, :40] = 0
    img = decode_gray(_write(_dataset(padded, bits=12, PixelPaddingValue=0), tmp_path / "pad.dcm"))
    assert np.array_equal(img.pixels[:, 40:], _scaled(raw[:, 40:]))
    assert (img.pixels[:, :40] == 0).all()
    assert any("padding" in n for n in img.notes)


def test_colour_dicom_with_a_window_is_a_listed_rejection(xray: np.ndarray, tmp_path: Path) -> None:
    rgb = np.repeat(xray[..., None], 3, axis=2)
    ds = _dataset(xray, WindowCenter=128, WindowWidth=200)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    path = _write(ds, tmp_path / "colour.dcm")
    with pytest.raises(ImageDecodeError, match="colour DICOM \\(RGB\\) with a VOI LUT"):
        decode_gray(path)
    del ds.WindowCenter, ds.WindowWidth  # without a window: converted to gray
    assert np.array_equal(decode_gray(_write(ds, tmp_path / "c2.dcm")).pixels, _scaled(xray))
    root = tmp_path / "folder" / "normal"
    root.mkdir(parents=True)
    path.rename(root / "colour.dcm")
    (tmp_path / "folder" / "covid").mkdir()
    Image.fromarray(xray).save(tmp_path / "folder" / "covid" / "a.png")
    Image.fromarray(xray[::-1]).save(root / "b.png")
    out = tmp_path / "prep"
    args = ["data", "prepare", "--folder", str(tmp_path / "folder"), "--data-dir", str(out)]
    assert main([*args, "--name", "c"]) == 2  # listed with its reason, no traceback
    assert main([*args, "--name", "c", "--skip-bad"]) == 0
    listed = "".join(p.read_text() for p in (out / "c").iterdir() if p.suffix in {".json", ".csv"})
    assert "colour DICOM (RGB) with a VOI LUT" in listed


def test_jpeg_baseline_and_jpeg2000_compressed(xray: np.ndarray, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(xray).save(buf, format="JPEG", quality=95)
    ds = _dataset(xray)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    img = decode_gray(_write(ds, tmp_path / "jpeg.dcm"))
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    assert np.abs(img.pixels.astype(int) - _scaled(ref).astype(int)).max() <= 2
    assert "JPEG" in img.mode
    raw = xray.astype(np.uint16) * 16
    ds2 = _dataset(raw, bits=12)
    ds2.compress(JPEG2000Lossless, raw)
    img2 = decode_gray(_write(ds2, tmp_path / "j2k"))  # extension-less
    assert np.array_equal(img2.pixels, _scaled(xray))


def test_rejected_with_the_reason(xray: np.ndarray, tmp_path: Path) -> None:
    good = _write(_dataset(xray), tmp_path / "good.dcm")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good.read_bytes()[:-5000])  # pixel data cut short
    with pytest.raises(ImageDecodeError, match="cannot decode DICOM pixel data|unreadable DICOM"):
        decode_gray(broken)
    header_only = tmp_path / "header.dcm"
    header_only.write_bytes(good.read_bytes()[:600])
    with pytest.raises(ImageDecodeError, match="no pixel data|unreadable DICOM"):
        decode_gray(header_only)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\x01\x02" * 40)
    with pytest.raises(ImageDecodeError, match="DICOM"):
        decode_gray(garbage)
    ct = _write(_dataset(xray, Modality="CT"), tmp_path / "ct.dcm")
    with pytest.raises(ImageDecodeError, match="modality CT is not a projection radiograph"):
        decode_gray(ct)
    lat = _write(_dataset(xray, ViewPosition="LL"), tmp_path / "lat.dcm")
    with pytest.raises(ImageDecodeError, match="lateral view \\(ViewPosition LL\\)"):
        decode_gray(lat)


def test_patient_id_becomes_the_split_group(xray: np.ndarray, tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for cls, pid, n in (("normal", "PAT-1", 2), ("covid", "PAT-2", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            _write(_dataset(xray, PatientID=pid), root / cls / f"img{i}")  # no extension
    Image.fromarray(xray).save(root / "covid" / "plain.png")
    table = read_folder(root).table
    assert len(table) == 4 and all(is_dicom(p) for p in table["path"] if not p.endswith(".png"))
    pids = dict(
        zip(
            table["path"].map(lambda p: Path(p).name + Path(p).parent.name),
            table["patient_id"],
            strict=True,
        )
    )
    assert pids["img0normal"] == pids["img1normal"] == "folder:PAT-1"
    assert pids["img0covid"] == "folder:PAT-2"
    assert pids["plain.pngcovid"].endswith("plain.png")  # non-DICOM: one image, one patient
    assert set(table.loc[table["path"].map(is_dicom), "view"]) == {"PA"}
    given = dicom_split_groups(table.assign(patient_id="x"), keep_given=True)
    assert set(given["patient_id"]) == {"x"}


def test_missing_patient_id_is_refused_not_split_by_study(xray: np.ndarray, tmp_path: Path) -> None:
    """Without PatientID each study would be its own split group (one patient's studies on
    both sides of a split): refused, naming the file; patient ids from a CSV are taken."""
    root = tmp_path / "folder"
    (root / "normal").mkdir(parents=True)
    ds = _dataset(xray)
    del ds.PatientID
    _write(ds, root / "normal" / "anon.dcm")
    with pytest.raises(DataError, match="have no PatientID.*anon.dcm.*CSV manifest"):
        read_folder(root)
    csv = tmp_path / "ids.csv"
    csv.write_text("path,label,patient_id\nfolder/normal/anon.dcm,normal,P9\n")
    assert list(read_csv_manifest(csv).table["patient_id"]) == ["ids:P9"]


@pytest.fixture(scope="module")
def dicom_folder(shared_data: Path, tmp_path_factory) -> Path:
    """Real X-rays as DICOM (a mix of MONOCHROME1/2, 8/12-bit, JPEG 2000, no extension), two
    files per patient, a folder per class; plus one CT that must be rejected."""
    root = tmp_path_factory.mktemp("dicom") / "hospital"
    sources = {
        "covid": sorted((shared_data / "cohen" / "images").glob("*.jp*g"))[:8],
        "normal": sorted((shared_data / "kermany" / "chest_xray" / "test" / "NORMAL").glob("*"))[
            :8
        ],
    }
    for cls, paths in sources.items():
        (root / cls).mkdir(parents=True)
        for i, p in enumerate(paths):
            px = decode_gray(p).pixels
            pid = f"{cls}-{i // 2}"
            if i % 4 == 0:
                ds = _dataset(255 - px, photometric="MONOCHROME1", PatientID=pid)
            elif i % 4 == 1:
                ds = _dataset(px.astype(np.uint16) * 16, bits=12, PatientID=pid)
            elif i % 4 == 2:
                raw = px.astype(np.uint16) * 16
                ds = _dataset(raw, bits=12, PatientID=pid)
                ds.compress(JPEG2000Lossless, raw)
            else:
                ds = _dataset(px, PatientID=pid)
            _write(ds, root / cls / (f"{i:02d}.dcm" if i % 2 else f"{i:02d}"))
    return root


def test_prepare_folder_of_dicom_groups_by_patient(
    dicom_folder: Path, tmp_path: Path, capsys
) -> None:
    from automl_cxr.cli import main
    from automl_cxr.data import load_dataset

    args = ["data", "prepare", "--folder", str(dicom_folder), "--name", "hosp"]
    assert main([*args, "--data-dir", str(tmp_path)]) == 0
    ds = load_dataset("hosp", tmp_path)
    m = ds.manifest
    assert len(m) == 16 and sorted(ds.classes) == ["covid", "normal"]
    assert m["patient_id"].str.split(":").str[-1].nunique() == 8
    groups = m.groupby(m["patient_id"])["group_id"].nunique()
    assert (groups == 1).all() and ds.groups.size == 16
    assert len(set(ds.groups)) <= 8  # two files per patient share a split group
    pixels = ds.images(64)
    assert pixels.shape == (16, 64, 64) and pixels.std() > 10


def test_predict_dicom_writes_a_secondary_capture(
    dicom_folder: Path, smoke_study: Path, prepared_dir: Path, tmp_path: Path, capsys
) -> None:
    from automl_cxr.cli import main
    from automl_cxr.deploy import ExportedModel, predict_images

    out = tmp_path / "model"
    args = ["export", "--study", str(smoke_study), "--out", str(out), "--no-calibrate"]
    assert main([*args, "--data-dir", str(prepared_dir), "--quiet"]) == 0
    files = sorted((dicom_folder / "covid").iterdir())[:2]
    res = predict_images(
        ExportedModel(out), files, explain=True, out_dir=tmp_path / "gc", dicom_sc=True
    )
    for r, f in zip(res, files, strict=True):
        sc = pydicom.dcmread(r["gradcam_dicom"])
        src = pydicom.dcmread(f)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.Modality == "OT"
        assert sc.PatientID == src.PatientID and sc.StudyInstanceUID == src.StudyInstanceUID
        assert sc.SeriesInstanceUID != src.SeriesInstanceUID
        assert sc.pixel_array.shape == (src.Rows, src.Columns, 3)
        png = np.asarray(Image.open(r["gradcam"]))
        assert np.array_equal(sc.pixel_array, png)  # the same overlay as the PNG
    cli_out = tmp_path / "cli"
    assert main(["predict", str(out), str(files[0]), "--dicom-sc", "--out", str(cli_out)]) == 0
    assert (cli_out / f"{files[0].stem}_gradcam.dcm").is_file()  # --dicom-sc implies --explain
    # evaluate reads the DICOM folder; the bootstrap resamples the DICOM patients
    import json

    capsys.readouterr()  # the predict table above
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(dicom_folder),
                "--model",
                str(out),
                "--json",
                "--n-boot",
                "50",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["n_images"] == 16 and res["counts"] == {"covid": 8, "bacterial": 0, "normal": 8}
    assert res["bootstrap"]["unit"] == "patient" and res["bootstrap"]["n_units"] == 8


def test_prepare_rejects_a_ct_with_the_reason_and_reads_a_csv(
    dicom_folder: Path, xray: np.ndarray, tmp_path: Path, capsys
) -> None:
    import shutil

    from automl_cxr.cli import main
    from automl_cxr.data import load_dataset

    root = tmp_path / "with-ct"
    shutil.copytree(dicom_folder, root, symlinks=True)
    _write(_dataset(xray, Modality="CT", PatientID="CT-1"), root / "normal" / "ct.dcm")
    args = ["data", "prepare", "--folder", str(root), "--name", "h2", "--data-dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ct.dcm" in err and "modality CT is not a projection radiograph" in " ".join(err.split())
    assert main([*args, "--skip-bad"]) == 0
    capsys.readouterr()
    assert len(load_dataset("h2", tmp_path).manifest) == 16
    # a CSV manifest without patient ids: the DICOM PatientID is the split group
    files = sorted(p for p in dicom_folder.rglob("*") if p.is_file())
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    assert (
        main(["data", "prepare", "--csv", str(csv), "--name", "h3", "--data-dir", str(tmp_path)])
        == 0
    )
    m = load_dataset("h3", tmp_path).manifest
    assert m["patient_id"].str.split(":").str[-1].nunique() == 8
