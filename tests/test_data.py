"""Data layer on the real shared X-rays: readers, recipes, rejects, duplicates, cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from automl_cxr.cli import main
from automl_cxr.data import (
    decode_gray,
    get_recipe,
    load_dataset,
    prepare_recipes,
    prepare_table,
    read_cohen,
    read_folder,
    read_kermany,
)
from automl_cxr.data._diagnostics import source_label_alignment
from automl_cxr.errors import ConfigError, DataError, ImageDecodeError


def test_cohen_reader_frontal_covid(shared_data: Path) -> None:
    t = read_cohen(shared_data / "cohen").table
    assert len(t) == 570
    assert set(t["view"]) <= {"PA", "AP", "AP Supine"}
    covid = t[t.label == "covid"]
    assert len(covid) == 422
    assert covid["patient_id"].nunique() == 260
    assert t["patient_id"].str.startswith("cohen:").all()
    assert all(Path(p).is_file() for p in t["path"])


def test_kermany_reader_labels_and_patients(shared_data: Path) -> None:
    t = read_kermany(shared_data / "kermany").table
    counts = t["label"].value_counts().to_dict()
    assert counts == {"bacterial": 841, "normal": 487, "viral": 420}
    normal = t[t.label == "normal"]
    assert normal["patient_id"].nunique() == 470
    assert t[t.label == "bacterial"]["patient_id"].nunique() == 580
    # 126 personN ids occur under both bacteria and virus: surfaced, not hidden
    pneu = t[t.label != "normal"]
    assert (pneu.groupby("patient_id")["label"].nunique() > 1).sum() == 126
    assert set(t["split"]) == {"train", "test"}


def test_recipes_counts_shortfalls_and_patient_sampling(prepared_dir: Path) -> None:
    three = load_dataset("three_class", prepared_dir)
    assert three.classes == ["covid", "bacterial", "normal"]
    assert three.meta["classes"] == {"bacterial": 700, "covid": 224, "normal": 487}
    # Kermany has 487 normals: the recipe says so instead of inventing images.
    assert three.meta["shortfalls"] == {"kermany:normal": {"target": 504, "available": 487}}
    four = load_dataset("four_class", prepared_dir)
    assert four.meta["classes"] == {"bacterial": 357, "covid": 224, "normal": 487, "viral": 357}
    binary = load_dataset("binary", prepared_dir)
    assert binary.meta["classes"] == {"covid": 224, "non_covid": 1201}
    for ds in (three, four, binary):
        m = ds.manifest
        assert list(m.columns[:10]) == [
            "path",
            "label",
            "patient_id",
            "group_id",
            "source",
            "view",
            "license",
            "sha256",
            "width",
            "height",
        ]
        assert m["sha256"].is_unique
        assert (m[m.label == "covid"]["source"] == "cohen").all()
    # Sampled by patient: a covid patient in the selection has all of its images there, except
    # at most the one patient cut at the cap.
    meta = load_dataset("three_class", prepared_dir).meta
    cohen = read_cohen(meta["sources_used"]["cohen"]).table
    # re-framed copies merged at prepare (the duplicate finder) are one image: count it once
    merged_away = {
        p
        for d in load_dataset("three_class", prepared_dir).near_duplicates
        if d["action"] == "copies merged"
        for p in (d["a"], d["b"])
        if p != d["kept"]
    }
    cohen = cohen[~cohen["path"].isin(merged_away)]
    per_patient_all = cohen[cohen.label == "covid"].groupby("patient_id").size()
    per_patient_sel = three.manifest[three.manifest.label == "covid"].groupby("patient_id").size()
    partial = [p for p, n in per_patient_sel.items() if n < per_patient_all[p]]
    assert len(partial) <= 1


def test_recipe_is_deterministic_and_seed_dependent(tmp_path: Path, shared_data: Path) -> None:
    kw = dict(cohen=shared_data / "cohen", kermany=shared_data / "kermany", recipes=["three_class"])
    prepare_recipes(data_dir=tmp_path / "a", seed=1, **kw)
    prepare_recipes(data_dir=tmp_path / "b", seed=1, **kw)
    prepare_recipes(data_dir=tmp_path / "c", seed=2, **kw)
    a, b, c = (load_dataset("three_class", tmp_path / x) for x in "abc")
    assert a.hash == b.hash
    assert a.hash != c.hash
    assert a.manifest["path"].tolist() == b.manifest["path"].tolist()


def test_count_override_and_bad_override(tmp_path: Path, shared_data: Path) -> None:
    prepare_recipes(
        cohen=shared_data / "cohen",
        kermany=shared_data / "kermany",
        data_dir=tmp_path,
        recipes=["four_class"],
        counts={"viral": 100, "bacterial": 50},
    )
    ds = load_dataset("four_class", tmp_path)
    assert ds.meta["classes"]["viral"] == 100 and ds.meta["classes"]["bacterial"] == 50
    with pytest.raises(ConfigError, match="no pool label.*'fungal'"):
        get_recipe("four_class").with_counts({"fungal": 3})


def test_same_radiograph_under_two_patient_ids_is_one_split_group(prepared_dir: Path) -> None:
    m = load_dataset("three_class", prepared_dir).manifest
    # Cohen patients 97 and 178 are the same four radiographs: merged into one group.
    g97 = set(m[m.patient_id == "cohen:97"]["group_id"])
    g178 = set(m[m.patient_id == "cohen:178"]["group_id"])
    if g97 and g178:
        assert g97 == g178
    pairs = {
        tuple(sorted(p["patients"]))
        for p in load_dataset("three_class", prepared_dir).near_duplicates
    }
    assert ("cohen:178", "cohen:97") in pairs


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated.jpeg", "truncated"),
        ("empty.jpeg", "empty"),
        ("not_an_image.png", "not a recognised image"),
        ("one_pixel.png", "too small"),
    ],
)
def test_bad_files_are_rejected_with_reason(shared_data: Path, name: str, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as exc:
        decode_gray(shared_data / "bad" / name)
    assert name in str(exc.value)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    from automl_cxr.data import resize_square

    a = resize_square(a, 64).astype(float).ravel()
    b = resize_square(b, 64).astype(float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize(
    "name", ["gray16.png", "gray16_12bit.png", "rgba.png", "cmyk.jpg", "jpeg_named.png"]
)
def test_awkward_files_convert_correctly(shared_data: Path, name: str) -> None:
    ref = decode_gray(shared_data / "kermany/chest_xray/train/NORMAL/IM-0115-0001.jpeg").pixels
    img = decode_gray(shared_data / "bad" / name)
    assert img.pixels.dtype == np.uint8 and img.pixels.ndim == 2
    if name == "rgba.png":
        # the transparent top quarter is black, the rest is the radiograph
        q = img.height // 4
        assert img.pixels[: q - 1].max() == 0
        assert (
            _corr(img.pixels[q + 1 :], ref[q + 1 :]) > 0.95
            if img.pixels.shape == ref.shape
            else True
        )
        return
    assert _corr(img.pixels, ref) > 0.97, name
    if name == "gray16_12bit.png":
        # rescaled by its real range: not crushed to near black
        assert img.pixels.max() >= 250
        assert abs(float(img.pixels.mean()) - float(ref.mean())) < 10
    if name == "jpeg_named.png":
        assert img.format == "JPEG" and any("extension" in n for n in img.notes)


def _user_folder(tmp_path: Path, shared_data: Path, bad: list[str]) -> Path:
    root = tmp_path / "mine"
    for label, src in (("normal", "NORMAL"), ("pneumonia", "PNEUMONIA")):
        d = root / label
        d.mkdir(parents=True)
        for f in sorted((shared_data / "kermany/chest_xray/test" / src).iterdir())[:6]:
            shutil.copy(f, d / f.name)
    for b in bad:
        shutil.copy(shared_data / "bad" / b, root / "normal" / b)
    return root


def test_folder_dataset_rejects_bad_files_or_skips_them(tmp_path: Path, shared_data: Path) -> None:
    bad = ["truncated.jpeg", "empty.jpeg", "not_an_image.png", "one_pixel.png"]
    good_extra = ["gray16.png", "rgba.png", "cmyk.jpg", "jpeg_named.png", "gray16_12bit.png"]
    root = _user_folder(tmp_path, shared_data, bad + good_extra)
    with pytest.raises(DataError, match="4 image\\(s\\) cannot be used") as exc:
        prepare_table(
            read_folder(root), name="mine", data_dir=tmp_path / "d", kind="folder", origin=str(root)
        )
    for b in bad:
        assert b in str(exc.value)
    assert not (tmp_path / "d" / "mine").exists()  # nothing half-written
    prepare_table(
        read_folder(root),
        name="mine",
        data_dir=tmp_path / "d",
        kind="folder",
        origin=str(root),
        skip_bad=True,
    )
    ds = load_dataset("mine", tmp_path / "d")
    assert sorted(Path(r["path"]).name for r in ds.meta["rejected"]) == sorted(bad)
    # gray16 and gray16_12bit and the others are all copies of one Kermany image (different
    # bytes): the duplicate finder merges them into one image
    assert len(ds) == 12 + 1
    assert ds.meta["copies_removed"] == len(good_extra) - 1  # five copies, one kept
    assert ds.classes == ["normal", "pneumonia"]


def test_exact_duplicates_removed_and_conflicts_reported(tmp_path: Path, shared_data: Path) -> None:
    root = _user_folder(tmp_path, shared_data, [])
    normal = sorted((root / "normal").iterdir())
    shutil.copy(normal[0], root / "normal" / "copy.jpeg")  # same label: removed
    shutil.copy(normal[1], root / "pneumonia" / "conflict.jpeg")  # two labels: conflict
    prepare_table(
        read_folder(root), name="dups", data_dir=tmp_path / "d", kind="folder", origin=str(root)
    )
    ds = load_dataset("dups", tmp_path / "d")
    assert ds.meta["duplicates_removed"] == 1
    assert len(ds.meta["label_conflicts"]) == 1
    assert sorted(ds.meta["label_conflicts"][0]["labels"]) == ["normal", "pneumonia"]
    assert len(ds) == 12 - 1  # conflicting pair dropped, duplicate removed


def test_image_cache_round_trip(prepared_dir: Path) -> None:
    ds = load_dataset("three_class", prepared_dir)
    arr = np.asarray(ds.images(64))
    assert arr.shape == (len(ds), 64, 64) and arr.dtype == np.uint8
    assert ds.cache_path(64).is_file()
    again = load_dataset("three_class", prepared_dir)

    def no_decoding(*a, **k):
        raise AssertionError("the cache file should have been read, not the images decoded")

    again._decode_all = no_decoding  # type: ignore[method-assign]
    cached = again.images(64)
    assert isinstance(cached, np.memmap)
    np.testing.assert_array_equal(arr, cached)
    # the cached pixels are the decoded file, resized
    from automl_cxr.data import resize_square

    i = 17
    direct = resize_square(decode_gray(ds.manifest.path[i]).pixels, 64)
    np.testing.assert_array_equal(cached[i], direct)


def test_source_alignment_warns_on_paper_recipe_only(prepared_dir: Path) -> None:
    m = load_dataset("three_class", prepared_dir).manifest
    a = source_label_alignment(m)
    assert a["cramers_v"] > 0.9 and a["warning"]
    assert {"label": "covid", "source": "cohen"} in a["confounded_classes"]
    rng = np.random.default_rng(0)
    shuffled = m.assign(source=rng.permutation(m["source"].to_numpy()))
    b = source_label_alignment(shuffled)
    assert b["warning"] is None and b["cramers_v"] < 0.2


def test_cli_prepare_and_info_json(tmp_path: Path, shared_data: Path, capsys) -> None:
    rc = main(
        [
            "data",
            "prepare",
            "--sources",
            str(shared_data),
            "--data-dir",
            str(tmp_path),
            "--recipe",
            "binary",
            "-q",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["data", "info", "binary", "--data-dir", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dataset"] == "binary"
    assert info["classes"] == {"covid": 224, "non_covid": 1201}
    assert info["sources"] == {"cohen": 224, "kermany": 1201}
    assert set(info["patients"]) == {"covid", "non_covid"}
    assert info["rejected"] == [] and info["duplicates_removed"] == 0
    assert info["source_label_alignment"]["warning"]


def test_cli_errors_are_clear(tmp_path: Path, capsys) -> None:
    assert main(["data", "info", "nope", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nope'" in err and "data prepare" in err
    assert main(["data", "prepare", "--sources", str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    assert "neither cohen/ nor kermany/" in capsys.readouterr().err
    assert main(["data", "prepare", "--recipe", "five_class", "--data-dir", str(tmp_path)]) == 2
    assert "unknown dataset recipe 'five_class'" in capsys.readouterr().err


def test_cli_fetch_offline_fails_fast(tmp_path: Path, capsys, monkeypatch) -> None:
    import socket
    import urllib.request

    tried: list[tuple] = []

    def offline(address, timeout=None, *a, **k):
        tried.append((address, timeout))
        raise OSError("Network is unreachable")

    def no_download(*a, **k):
        raise AssertionError("no download may be attempted offline")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    assert main(["data", "fetch", "--dest", str(tmp_path), "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "by hand" in err and "https://nihcc.app.box.com/v/ChestXray-NIHCC" in err
    assert tried == [(("github.com", 443), 2.0)]  # one probe, with the given timeout
    # cohen/ and kermany/ present: NIH is not downloaded, but offline it fails fast too
    for name in ("cohen", "kermany"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("")
    assert main(["data", "fetch", "--dest", str(tmp_path), "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "nihcc.app.box.com" in err and "images_001" in err


def test_image_too_small_for_radiograph(tmp_path: Path) -> None:
    p = tmp_path / "tiny.png"
    Image.fromarray(np.full((40, 300), 128, np.uint8)).save(p)
    with pytest.raises(ImageDecodeError, match="300x40 px, too small"):
        decode_gray(p)


def test_image_cache_is_written_in_chunks_and_shared_copy_on_write(
    prepared_dir: Path, tmp_path: Path
) -> None:
    """The cache is decoded and written a chunk at a time (rows past the first chunk are the
    files' pixels too); a whole mapped cache is handed out copy-on-write (writable, the file
    untouched by a write), a slice of it as a copy."""
    from automl_cxr.data import mapped_copy_on_write, resize_square
    from automl_cxr.data._dataset import save_npy_rows_atomic

    ds = load_dataset("three_class", prepared_dir)
    assert len(ds) > 1024  # more than one chunk of `_decode_all`
    cached = ds.images(40)
    for i in (0, 1023, 1024, len(ds) - 1):
        direct = resize_square(decode_gray(ds.manifest.path[i]).pixels, 40)
        np.testing.assert_array_equal(cached[i], direct)

    cow = mapped_copy_on_write(cached)
    assert isinstance(cow, np.memmap) and cow.flags.writeable
    np.testing.assert_array_equal(cow, cached)
    before = int(cached[5, 0, 0])
    cow[5, 0, 0] = before ^ 0xFF
    assert int(np.load(ds.cache_path(40), mmap_mode="r")[5, 0, 0]) == before
    part = mapped_copy_on_write(cached[10:20])
    assert not isinstance(part, np.memmap) and part.shape == (10, 40, 40)
    np.testing.assert_array_equal(part, cached[10:20])

    out = tmp_path / "rows.npy"
    with pytest.raises(ValueError, match="needs 3"):
        save_npy_rows_atomic(out, (3, 2), np.uint8, [np.zeros((2, 2), np.uint8)])
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
