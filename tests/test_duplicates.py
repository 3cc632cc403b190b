"""The duplicate finder (data/_duplicates.py) on the shared films: re-framed copies are found at
prepare and at --external, the NIH films (one per patient) yield no pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from automl_cxr.data import (
    COPY_INLIERS,
    MATCH_INLIERS,
    LocalFeatures,
    decode_gray,
    find_matches,
    load_dataset,
    prepare_table,
    read_cohen,
    read_csv_manifest,
)
from automl_cxr.data._dupcache import features_for
from automl_cxr.data._reframe import reframe
from automl_cxr.errors import DataError


def _copy_of(path: str | Path, out: Path, seed: int) -> Path:
    r = reframe(decode_gray(path).pixels, np.random.default_rng(seed))
    out = out.with_suffix(r.suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(r.data)
    return out


def test_thresholds_are_ordered() -> None:
    assert 0 < MATCH_INLIERS < COPY_INLIERS


def test_nih_films_yield_no_pair(shared_data: Path) -> None:
    """621 NIH films, each of another patient: not one copy, not one same-patient match, by
    keypoints or by aligned texture (the finder reads the files, as `data prepare` does)."""
    paths = sorted((shared_data / "nih" / "images").glob("*.png"))
    assert len(paths) == 621
    imgs = [decode_gray(p) for p in paths]
    feats = LocalFeatures.stack([features_for(i.pixels, i.sha256) for i in imgs])
    assert find_matches(feats, paths=paths) == []


def test_reframed_copy_in_a_second_source_is_merged_and_joins_the_patient(
    tmp_path: Path, shared_data: Path
) -> None:
    cohen = read_cohen(shared_data / "cohen").table
    multi = cohen.groupby("patient_id").filter(lambda g: len(g) >= 2)
    pid = sorted(multi["patient_id"].unique())[0]
    first, second = multi[multi.patient_id == pid]["path"].iloc[:2]
    others = cohen[~cohen.patient_id.isin([pid])].drop_duplicates("patient_id").iloc[:6]
    nih = sorted((shared_data / "nih" / "images").glob("*.png"))[:6]
    copy = _copy_of(first, tmp_path / "reprint" / "fig2", seed=3)
    rows = [
        {"path": first, "label": "covid", "patient_id": "p", "source": "cohen"},
        {"path": second, "label": "covid", "patient_id": "p", "source": "cohen"},
        {"path": str(copy), "label": "covid", "patient_id": "fig2", "source": "reprint"},
        *(
            {"path": p, "label": "covid", "patient_id": f"o{i}", "source": "cohen"}
            for i, p in enumerate(others["path"])
        ),
        *(
            {"path": str(p), "label": "normal", "patient_id": f"n{i}", "source": "nih"}
            for i, p in enumerate(nih)
        ),
    ]
    csv = tmp_path / "mixed.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    prepare_table(
        read_csv_manifest(csv), name="mixed", data_dir=tmp_path / "d", kind="csv", origin=str(csv)
    )
    ds = load_dataset("mixed", tmp_path / "d")
    m = ds.manifest
    assert len(ds) == len(rows) - 1  # the copy and its original are one image now
    assert ds.meta["copies_removed"] == 1
    pair = [
        p
        for p in ds.near_duplicates
        if {Path(p["a"]).name, Path(p["b"]).name} == {Path(first).name, copy.name}
    ]
    assert len(pair) == 1, ds.near_duplicates
    # the pairs live in their own file: every process of a search loads dataset.json
    assert "near_duplicates" not in ds.meta
    assert "near_duplicates" not in (tmp_path / "d" / "mixed" / "dataset.json").read_text()
    assert ds.meta["near_duplicate_pairs"] == len(ds.near_duplicates) >= 1
    ev = pair[0]
    assert ev["kind"] == "copy" and ev["action"] == "copies merged"
    assert sorted(ev["sources"]) == ["cohen", "reprint"]
    assert ev["inliers"] >= COPY_INLIERS and {"scale_x", "rotation"} <= set(ev["transform"])
    # one split group holds the kept image, the patient's other film and the reprint's patient
    kept = m[m.path.isin([first, str(copy)])]
    assert len(kept) == 1
    other_film = m[m.path == second]
    assert kept["group_id"].iloc[0] == other_film["group_id"].iloc[0]
    assert set(ev["patients"]) == {"mixed:p", "mixed:fig2"}
    assert ds.groups.tolist().count(kept["group_id"].iloc[0]) == 2
    # the finder's keypoints are saved row-aligned with the manifest
    feats = ds.local_features()
    assert len(feats) == len(ds)


def test_reframed_copy_is_refused_as_external_and_dropped_on_request(
    prepared_dir: Path, tmp_path: Path, shared_data: Path
) -> None:
    from automl_cxr.study._external import external_summary, prepare_externals

    ds = load_dataset("binary_adult", prepared_dir)
    src = ds.manifest["path"].iloc[5]
    ext = tmp_path / "ext"
    copy = _copy_of(src, ext / "covid" / "reprinted", seed=11)
    # a child's film: no adult recipe holds it
    other = sorted((shared_data / "kermany" / "chest_xray" / "test" / "NORMAL").iterdir())[:2]
    (ext / "non_covid").mkdir()
    for p in other:
        (ext / "non_covid" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(
        DataError,
        match=rf"not external: 1 of its 3 images .*{copy.name} ~ "
        rf"{Path(src).name} \(same (radiograph|patient), \d+ inliers\)",
    ):
        prepare_externals([ext], dataset=ds, data_dir=tmp_path / "data")
    (sets,) = [prepare_externals([ext], dataset=ds, data_dir=tmp_path / "data", drop_overlap=True)]
    assert len(sets) == 1 and len(sets[0]) == 2
    summary = external_summary(sets)["ext"]
    assert [Path(p["external"]).name for p in summary["dropped_overlap"]] == [copy.name]


CHROMIUM = Path("/usr/bin/chromium")


def test_data_duplicates_writes_table_and_contact_sheet_that_renders(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import subprocess

    from automl_cxr.cli import main

    cohen = read_cohen(shared_data / "cohen").table.drop_duplicates("patient_id")
    films = cohen["path"].iloc[:3].tolist()
    folder = tmp_path / "mine"
    (folder / "covid").mkdir(parents=True)
    for p in films:
        (folder / "covid" / Path(p).name).write_bytes(Path(p).read_bytes())
    copy = _copy_of(films[0], folder / "covid" / "reprint", seed=5)
    out = tmp_path / "report"
    assert main(["data", "duplicates", str(folder), "--out", str(out), "--quiet"]) == 0
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 1
    assert {Path(pairs["a"][0]).name, Path(pairs["b"][0]).name} == {copy.name, Path(films[0]).name}
    assert pairs["inliers"][0] >= MATCH_INLIERS
    page = (out / "contact_sheet.html").read_text()
    assert page.count("<img ") == 1 and copy.name in page
    # bad input: a clear error, non-zero exit
    assert (
        main(["data", "duplicates", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path / "d")])
        != 0
    )
    assert "neither a folder, a CSV manifest nor a prepared dataset" in capsys.readouterr().err
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (CI installs it: apt-get install -y chromium)")
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.replace(
            "</body>",
            "<script>window.addEventListener('load',function(){"
            "var i=[].slice.call(document.images);"
            "document.body.setAttribute('data-rendered',i.filter(function(x){return x.complete&&"
            "x.naturalWidth>0}).length+'/'+i.length)})</script></body>",
        )
    )
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-rendered="1/1"' in proc.stdout


def test_evaluate_data_refuses_a_reframed_training_image_before_any_work(
    smoke_study: Path, prepared_dir: Path, tmp_path: Path, shared_data: Path
) -> None:
    """`evaluate --data` ran only a byte check; now the finder refuses a re-framed copy (before
    retraining anything), naming the pair."""
    from automl_cxr.deploy._commands import _check_overlap, open_trial
    from automl_cxr.deploy._evaluate import load_external
    from automl_cxr.deploy._select import training_data

    spec = open_trial(smoke_study, None, "best")
    ds = training_data(spec, prepared_dir)  # the images the trial trained on (a subsample)
    src = ds.manifest[ds.manifest.label == "normal"]["path"].iloc[4]
    ext = tmp_path / "ext"
    copy = _copy_of(src, ext / "normal" / "from_a_paper", seed=21)
    nih = sorted((shared_data / "nih" / "images").glob("*.png"))[0]  # no paper recipe holds NIH
    (ext / "normal" / nih.name).write_bytes(nih.read_bytes())
    loaded = load_external(ext, spec.classes, 32)
    with pytest.raises(DataError, match=rf"{copy.name} ~ {Path(src).name} \(same "):
        _check_overlap(loaded, ext, spec, None, prepared_dir, False, None)
    kept, check = _check_overlap(loaded, ext, spec, None, prepared_dir, True, None)
    assert kept.table["path"].map(lambda p: Path(p).name).tolist() == [nih.name]
    assert len(kept.images) == len(kept.labels) == 1
    assert [Path(p["external"]).name for p in check["dropped"]] == [copy.name]


def test_cached_pairs_keep_the_direction_their_transform_maps(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's pairs are reused from the cache in another row order; a pair read back names
    the image its transform maps from as `a` (it was sorted, silently flipping the transform)."""
    from automl_cxr.data._dupcache import find_matches_keyed

    monkeypatch.setenv("AUTOML_CXR_CACHE", str(tmp_path / "cache"))
    film = read_cohen(shared_data / "cohen").table["path"].iloc[0]
    copy = _copy_of(film, tmp_path / "copy", seed=5)
    items = [features_for(decode_gray(p).pixels, decode_gray(p).sha256) for p in (film, copy)]
    (first,) = find_matches_keyed(LocalFeatures.stack(items), ["film", "copy"])
    assert (first.a, first.b) == (0, 1)
    (again,) = find_matches_keyed(LocalFeatures.stack(items[::-1]), ["copy", "film"])
    assert (again.a, again.b) == (1, 0)  # still film → copy
    assert again.transform == first.transform and again.inliers == first.inliers


def test_ransac_stops_when_no_passing_model_is_left_to_find(shared_data: Path) -> None:
    """The finder fits RANSAC only as long as a model with `MATCH_INLIERS` inliers could still
    be missed (99.5 %); a pair with fewer candidate matches is not fitted at all. A re-framed
    copy verifies as before, with the same inliers as with the full 2,000 iterations."""
    import numpy as np

    from automl_cxr.data import decode_gray
    from automl_cxr.data._duplicates import (
        MATCH_INLIERS,
        RANSAC_MAX_ITERS,
        ransac_iterations,
        verify_pair,
    )
    from automl_cxr.data._keypoints import local_features
    from automl_cxr.data._reframe import reframe

    assert ransac_iterations(MATCH_INLIERS - 1, MATCH_INLIERS) == 0
    its = [ransac_iterations(n, MATCH_INLIERS) for n in (30, 36, 54, 100, 200, 1000)]
    assert its == sorted(its) and its[0] == 1 and its[-1] == RANSAC_MAX_ITERS
    film = sorted((shared_data / "cohen" / "images").glob("*"))[3]
    pixels = decode_gray(film).pixels
    copy = reframe(pixels, np.random.default_rng(1)).pixels
    a, b = local_features(pixels)[:2], local_features(copy)[:2]
    full, _ = verify_pair(a, b, min_inliers=4)
    bounded, tr = verify_pair(a, b, min_inliers=MATCH_INLIERS)
    assert tr is not None and bounded >= MATCH_INLIERS and abs(bounded - full) <= 2


def test_aligned_texture_tells_a_copy_from_another_patients_film(shared_data: Path) -> None:
    """Step 4's measure on real films lined up by a known transform: a re-windowed, JPEG-
    re-encoded copy agrees with its original cell by cell; two NIH patients' films, lined up
    the same way, do not (however alike their anatomy and framing)."""
    import cv2

    from automl_cxr.data._aligned import ALIGNED_CORRELATION, aligned_correlation
    from automl_cxr.data._keypoints import work_image

    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    nih = sorted((shared_data / "nih" / "images").glob("*.png"))[:6]
    films = [decode_gray(p).pixels for p in nih]
    gamma = (255 * (films[0] / 255.0) ** 1.3).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", gamma, [cv2.IMWRITE_JPEG_QUALITY, 60])
    copy = cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE)
    a = work_image(films[0])
    assert aligned_correlation(a, work_image(copy), identity) >= 0.8
    others = [aligned_correlation(a, work_image(f), identity) for f in films[1:]]
    assert all(c is not None and c < ALIGNED_CORRELATION / 2 for c in others), others
    # a transform that leaves nothing to compare gives no verdict
    away = np.array([[1.0, 0.0, 5.0], [0.0, 1.0, 5.0]])
    assert aligned_correlation(a, work_image(copy), away) is None


def test_aligned_texture_finds_copies_the_keypoints_miss_and_no_false_pair(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the keypoint rule made impossible to pass, the finder still confirms re-framed
    copies by their aligned texture when it can read the files (as a same-patient match with
    the correlation as evidence, kept through the pairs cache), and pairs none of 120 NIH films
    of 120 patients; without the files it finds nothing."""
    from automl_cxr.data import _duplicates
    from automl_cxr.data._dupcache import find_matches_keyed

    monkeypatch.setenv("AUTOML_CXR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_duplicates, "MATCH_INLIERS", 10**6)
    films = sorted((shared_data / "cohen" / "images").glob("*"))[10:13]
    copies = [_copy_of(f, tmp_path / f"copy{i}", seed=20 + i) for i, f in enumerate(films)]
    nih = sorted((shared_data / "nih" / "images").glob("*.png"))[:120]
    paths = [str(p) for p in [*films, *copies, *nih]]
    imgs = [decode_gray(p) for p in paths]
    feats = LocalFeatures.stack([features_for(i.pixels, i.sha256) for i in imgs])
    assert find_matches(feats) == []
    found = find_matches_keyed(feats, [i.sha256 for i in imgs], paths=paths)
    assert {(m.a, m.b) for m in found} == {(0, 3), (1, 4), (2, 5)}, found
    assert all(m.kind == "same_patient" and m.correlation >= 0.45 for m in found)
    assert all(m.evidence()["correlation"] == m.correlation for m in found)
    assert len(list((tmp_path / "cache").glob("pairs-*/*.json"))) == 1
    again = find_matches_keyed(feats, [i.sha256 for i in imgs], paths=paths)
    assert again == found
    # a file gone since its keypoints were taken: that pair is judged by keypoints only, and said
    copies[0].unlink()
    with pytest.warns(RuntimeWarning, match=r"1 candidate pair\(s\) could not be compared"):
        left = find_matches(feats, paths=paths)
    assert {(m.a, m.b) for m in left} == {(1, 4), (2, 5)}


def test_data_duplicates_says_when_the_aligned_texture_found_a_pair(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A pair only step 4 confirms is named as such in the console table, pairs.csv (its
    correlation) and the contact sheet's caption."""
    from automl_cxr.cli import main
    from automl_cxr.data import _duplicates

    monkeypatch.setenv("AUTOML_CXR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_duplicates, "MATCH_INLIERS", 10**6)  # keypoints alone never pass
    film = sorted((shared_data / "cohen" / "images").glob("*"))[11]
    folder = tmp_path / "mine" / "covid"
    folder.mkdir(parents=True)
    (folder / film.name).write_bytes(film.read_bytes())
    copy = _copy_of(film, folder / "reprint", seed=21)
    out = tmp_path / "report"
    assert main(["data", "duplicates", str(folder.parent), "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "same patient (texture 0." in text and copy.name in text
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 1 and pairs["correlation"][0] >= 0.45
    assert "found by aligned texture" in (out / "contact_sheet.html").read_text()


def test_shortlist_query_scans_the_same_codes_at_four_times_the_images(
    shared_data: Path,
) -> None:
    """The shortlist's inverted file keeps about `LIST_CODES` codes per list at any size: for
    four times the descriptors a query scans about as many codes (a fixed list count would scan
    four times as many), and a descriptor's near copy (2 % of its bits flipped) is still found
    as its nearest neighbour."""
    from automl_cxr.data._keypoints import extract_features
    from automl_cxr.data._shortlist import LIST_CODES, PROBE, shortlist_index

    films = sorted((shared_data / "nih" / "images").glob("*.png"))[:60]
    base = extract_features([decode_gray(f).pixels for f in films]).descriptors
    rng = np.random.default_rng(0)

    def flipped(codes: np.ndarray) -> np.ndarray:
        bits = np.unpackbits(codes, axis=1)
        return np.packbits(bits ^ (rng.random(bits.shape) < 0.02), axis=1)

    scanned = []
    for times in (1, 4):
        codes = np.concatenate([base] + [flipped(base) for _ in range(times - 1)])
        index = shortlist_index(codes)
        sizes = np.array([index.invlists.list_size(i) for i in range(index.nlist)])
        assert index.nlist == pytest.approx(len(codes) / LIST_CODES, rel=0.1)
        _, lists = index.quantizer.search(codes[::20], PROBE)
        scanned.append(float(sizes[lists].sum(axis=1).mean()))
    assert scanned[1] < 1.5 * scanned[0], scanned
    _, near = index.search(flipped(base[::10]), 1)
    owner = near[:, 0] % len(base)  # any of the four copies of the descriptor
    assert np.mean(owner == np.arange(0, len(base), 10)) > 0.95


def test_list_by_list_search_finds_the_index_own_nearest_codes(shared_data: Path) -> None:
    """`nearest_owners` searches the inverted file list by list; it must find exactly the
    distances the index's own search finds, and with owners given never the row's own image."""
    from automl_cxr.data._keypoints import extract_features
    from automl_cxr.data._shortlist import _strongest, nearest_owners, shortlist_index

    films = sorted((shared_data / "nih" / "images").glob("*.png"))[:40]
    feats = extract_features([decode_gray(f).pixels for f in films])
    rows, owner = _strongest(feats)
    codes = np.ascontiguousarray(feats.descriptors[rows])
    index = shortlist_index(codes)
    assert index.nlist > 1  # an inverted file, not the exhaustive index
    dist, near = index.search(codes[::7], 1)
    d, o = nearest_owners(index, owner, codes[::7])
    assert np.array_equal(d, dist[:, 0])
    assert np.array_equal(o, owner[near[:, 0]])  # ties: the first indexed code, as faiss
    d, o = nearest_owners(index, owner, codes[::7], owner[::7])
    assert np.all(o != owner[::7]) and np.all((o >= 0) == (d <= 256))
    assert np.mean(d) > np.mean(dist[:, 0])  # its own code (distance 0) is skipped


def test_candidates_keep_each_films_best_voted_above_the_threshold() -> None:
    """`candidates` turns vote counts into the pairs to verify: at least `MIN_VOTES`, each
    query film's `SHORTLIST` best (ties to the lower index), and within one set a pair that
    either film ranks high enough."""
    from automl_cxr.data._shortlist import MIN_VOTES, SHORTLIST, candidates

    n = 20
    pairs = [(0, b, MIN_VOTES + 20 - b) for b in range(1, SHORTLIST + 3)]  # film 0: 7 above
    pairs += [(3, 9, MIN_VOTES - 1), (4, 9, MIN_VOTES), (4, 8, MIN_VOTES)]
    codes = np.array([a * n + b for a, b, _ in pairs])
    votes = np.array([v for *_, v in pairs])
    order = np.argsort(codes)
    across = candidates(codes[order], votes[order], n, same=False)
    assert sorted(b for a, b in across if a == 0) == list(range(1, SHORTLIST + 1))
    assert (3, 9) not in across and across[(4, 8)] == across[(4, 9)] == MIN_VOTES
    within = candidates(codes[order], votes[order], n, same=True)
    # film 0 keeps its 5 best, but films 6 and 7 each propose their pair with film 0
    assert {b for a, b in within if a == 0} == set(range(1, SHORTLIST + 3))
    assert candidates(codes[order], votes[order], n, same=False, min_votes=MIN_VOTES + 100) == {}


def test_pairs_implied_by_copies_are_not_verified_and_change_no_merge(
    tmp_path: Path, shared_data: Path
) -> None:
    """One film, three re-framings of it and unrelated films: the four are one radiograph.
    `skip_merged` verifies only what joins them (a copy pair implied by two found before it is
    skipped) and leaves the same sets of copies as verifying every candidate."""
    from automl_cxr.data._duplicates import UnionFind

    film = sorted((shared_data / "nih" / "images").glob("*.png"))[7]
    paths = [film] + [_copy_of(film, tmp_path / f"copy{s}", seed=s) for s in range(3)]
    paths += sorted((shared_data / "nih" / "images").glob("*.png"))[20:26]
    imgs = [decode_gray(p) for p in paths]
    feats = LocalFeatures.stack([features_for(i.pixels, i.sha256) for i in imgs])

    def sets(matches: list) -> set[frozenset[int]]:
        uf = UnionFind(range(len(paths)))
        for m in matches:
            if m.kind == "copy":
                uf.join(m.a, m.b)
        roots = [uf.find(i) for i in range(len(paths))]
        return {
            frozenset(i for i, r in enumerate(roots) if r == x) for x in roots if roots.count(x) > 1
        }

    every, merging = {}, {}
    full = find_matches(feats, paths=paths, timings=every)
    fewer = find_matches(feats, paths=paths, skip_merged=True, timings=merging)
    assert sets(full) == sets(fewer) == {frozenset(range(4))}
    assert len(full) == 6 and every["pairs_skipped"] == 0  # the 4 films' 6 pairs, no other
    # 3 copy pairs join 4 films; a 4th pair is listed when one was a weaker same-patient match
    assert len(fewer) < len(full) and merging["pairs_skipped"] == len(full) - len(fewer) >= 2
    assert merging["pairs_verified"] == every["pairs_verified"] - merging["pairs_skipped"]
    assert {(m.a, m.b) for m in fewer} < {(m.a, m.b) for m in full}
    with pytest.raises(ValueError, match="skip_merged"):
        find_matches(feats, feats, skip_merged=True)


def test_no_near_duplicates_keeps_reframed_copies_and_says_so(
    tmp_path: Path, shared_data: Path, capsys
) -> None:
    """`data prepare --no-near-duplicates`: a re-framed copy stays a row of its own patient
    group, a byte-identical copy is still removed, and `data info` says the pool was not
    searched; by default the same pool merges the copy and `data info` counts it."""
    from automl_cxr.cli import main

    nih = sorted((shared_data / "nih" / "images").glob("*.png"))[30:38]
    copy = _copy_of(nih[0], tmp_path / "reprint" / "fig", seed=3)
    same_bytes = tmp_path / "reprint" / "same.png"
    same_bytes.write_bytes(nih[1].read_bytes())
    rows = [(str(p), "normal", f"n{i}") for i, p in enumerate(nih)]
    rows += [(str(copy), "normal", "fig"), (str(same_bytes), "normal", "same")]
    cohen = read_cohen(shared_data / "cohen").table.drop_duplicates("patient_id").iloc[:6]
    rows += [(p, "covid", f"c{i}") for i, p in enumerate(cohen["path"])]
    csv = tmp_path / "pool.csv"
    pd.DataFrame(rows, columns=["path", "label", "patient_id"]).to_csv(csv, index=False)
    data = tmp_path / "d"
    for name, flag in (("searched", []), ("exact_only", ["--no-near-duplicates"])):
        argv = ["data", "prepare", "--csv", str(csv), "--name", name, "--data-dir", str(data)]
        assert main([*argv, *flag, "-q"]) == 0
    capsys.readouterr()

    on, off = load_dataset("searched", data), load_dataset("exact_only", data)
    assert on.meta["near_duplicate_search"] is True and off.meta["near_duplicate_search"] is False
    assert on.meta["duplicates_removed"] == off.meta["duplicates_removed"] == 1
    assert on.meta["copies_removed"] == 1 and len(on) == len(rows) - 2
    assert off.meta["copies_removed"] == 0 and len(off) == len(rows) - 1
    assert off.near_duplicates == [] and len(off.local_features()) == len(off)
    # without the search every patient is its own split group
    assert off.manifest["group_id"].nunique() == off.manifest["patient_id"].nunique() == len(off)
    assert str(copy) in set(off.manifest["path"]) and str(copy) not in set(on.manifest["path"])

    def info_line(name: str, what: str) -> str:
        assert main(["data", "info", name, "--data-dir", str(data)]) == 0
        out = capsys.readouterr().out
        return next(line for line in out.splitlines() if what in line)

    assert info_line("searched", "copies merged").split()[-1] == "1"
    assert "not searched (--no-near-duplicates)" in info_line("exact_only", "copies merged")
    assert "not searched" in info_line("exact_only", "same-radiograph or same-patient pairs")
