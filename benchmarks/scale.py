"""Cost as the data grows (issue 26 §1): `data prepare`, a cpu-profile `search` and `report`
on N synthetic radiographs at NIH's 1024 x 1024, for several N.

    python benchmarks/scale.py [--sizes 2000,10000,50000] [--trials 20] [--work DIR] [--keep]
        [--no-near-duplicates] [--json benchmarks/scale.json]

**Inputs.** N images made from the shared radiographs (every film of cohen/, kermany/, nih/):
each a random crop (70-100 % of each side), a horizontal flip half of the time, a gamma in
0.8-1.25 and a small brightness shift, resized to 1024 x 1024 and written as PNG (as NIH ships
its films) or JPEG (quality 90), half each, so decoding costs what a real film costs. Two
classes (`covid` from Cohen films, `normal` from NIH and Kermany films), 1-3 images per patient,
eight sites. There are 1,678 source films (Cohen's images, NIH's PNGs, Kermany's normals):
beyond that number they repeat under new crops, the duplicate finder rightly finds re-framed
copies and merges them (counted in the table), as it would in a collection that copies its
films, and every image made from one source film then belongs to that film's patient and site
(drawn at random, the finder's joins left one patient group per class at 50,000 images, and no
fold split; measured 2026-12-06). With `--no-near-duplicates` the datasets are prepared
without the search for re-framed copies (`data prepare --no-near-duplicates`: byte-identical
copies only), so every one of the N images is a row of the search, each source film's images
one patient group; that measures a search over N images, where the finder's merges leave
about 3,400 rows at 50,000. Disk: ~0.45 MB per image (about 23 GB at
50,000), in `--work` (default: a temporary folder, removed afterwards unless `--keep`).

**Measured per N** (one after the other, nothing else running on the machine):
- `automl-cxr data prepare --csv` as a subprocess: wall time, peak RSS of its process tree, and
  the stage times it records in dataset.json (`timings`: decoding + checks + the finder's
  keypoints; exact duplicates + the finder's shortlist and geometric verification);
- `automl-cxr search --profile cpu --trials T` (two worker processes): wall time, per finished
  trial and per image, peak RSS summed over the whole process tree (parent and workers);
- `automl-cxr report` on that study: wall time, page size.

Memory is read from /proc every 0.2 s for the process and all its descendants: the peak of
the summed RSS (a page shared by the workers, e.g. the memory-mapped image cache, counts once
per worker) and of the summed PSS (shared pages split between the processes that map them:
what the tree really holds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("AUTOML_CXR_SHARED", REPO.parent / "shared" / "data"))
SIDE = 1024
SITES = 8


# ----------------------------------------------------------------------------- inputs


def _films() -> tuple[list[Path], list[Path]]:
    covid = sorted((SHARED / "cohen" / "images").glob("*"))
    normal = sorted((SHARED / "nih" / "images").glob("*.png"))
    normal += sorted((SHARED / "kermany").rglob("NORMAL/*.jpeg"))
    return covid, normal


def _make_one(job: tuple[int, str, str, str]) -> bool:
    """Write film `i` of `src` to `dst`; whether it was flipped."""
    import cv2

    i, src, dst, _ = job
    rng = np.random.default_rng(i)
    img = cv2.imread(src, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SystemExit(f"cannot read {src}")
    h, w = img.shape
    ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = img[y : y + ch, x : x + cw]
    flip = rng.random() < 0.5
    if flip:
        img = img[:, ::-1]
    img = cv2.resize(np.ascontiguousarray(img), (SIDE, SIDE), interpolation=cv2.INTER_CUBIC)
    f = img.astype(np.float32) / 255.0
    f = np.clip(f ** rng.uniform(0.8, 1.25) + rng.uniform(-0.03, 0.03), 0, 1)
    out = (f * 255).astype(np.uint8)
    if dst.endswith(".png"):
        cv2.imwrite(dst, out)
    else:
        cv2.imwrite(dst, out, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return flip


def draws(n: int) -> list[tuple[str, int, str, int, Path]]:
    """(label, patient number, site, source index k, source film) of each of `n` synthetic
    films, drawn in order from one seeded generator."""
    covid, normal = _films()
    rng = np.random.default_rng(0)
    out, patient, left = [], 0, 0
    for _ in range(n):
        if left == 0:
            patient += 1
            left = int(rng.integers(1, 4))
            label = "covid" if rng.random() < 0.4 else "normal"
            site = f"site{int(rng.integers(0, SITES))}"
        left -= 1
        pool = covid if label == "covid" else normal
        k = int(rng.integers(0, len(pool)))
        out.append((label, patient, site, k, pool[k]))
    return out


def make_inputs(n: int, folder: Path) -> Path:
    """`n` synthetic films and their CSV manifest (path,label,patient_id,site); reuses files
    already made by a smaller or equal run in the same folder."""
    covid, normal = _films()
    folder.mkdir(parents=True, exist_ok=True)
    rows, jobs = [], []
    for i, (label, patient, site, k, src) in enumerate(draws(n)):
        dst = folder / f"img{i:06d}.{'png' if i % 2 == 0 else 'jpg'}"
        if n > len(covid) + len(normal):
            # every film made from one source film is that film's patient's: copies join
            # patients (the finder's rule), so patients drawing films at random would at 50,000
            # images all be joined into one patient group per class and no fold split would exist
            # (`draws` still makes the patient/label/site draws, so the same images are made)
            rows.append((dst.name, label, f"{label}{k}", f"site{k % SITES}"))
        else:
            rows.append((dst.name, label, f"p{patient}", site))
        if not dst.exists():
            jobs.append((i, str(src), str(dst), label))
    if jobs:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as ex:
            list(ex.map(_make_one, jobs, chunksize=32))
        print(f"  made {len(jobs)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    csv = folder / f"manifest_{n}.csv"
    with csv.open("w") as f:
        f.write("path,label,patient_id,site\n")
        f.writelines(f"{a},{b},{c},{d}\n" for a, b, c, d in rows)
    return csv


# ----------------------------------------------------------------------------- measuring


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes summed over `pid` and all its descendants (from /proc). RSS counts a
    page shared by two workers (the memory-mapped image cache) twice; PSS splits it between
    them, so the PSS sum is what the tree really holds."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd`, return wall seconds and the peak RSS and PSS of its process tree."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        peak, peak_pss, done = 0, 0, threading.Event()

        def poll() -> None:
            nonlocal peak, peak_pss
            while not done.is_set():
                rss, pss = _tree_memory(proc.pid)
                peak, peak_pss = max(peak, rss), max(peak_pss, pss)
                done.wait(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(peak / 2**30, 2),
        "peak_pss_gb": round(peak_pss / 2**30, 2),
    }


def measure(n: int, work: Path, trials: int, row: dict, save, near_duplicates: bool = True) -> None:
    exe = [sys.executable, "-m", "automl_cxr"]
    csv = make_inputs(n, work / "images")
    data = work / "data"
    name = f"scale{n}"
    prep = run_measured(
        [*exe, "data", "prepare", "--csv", str(csv), "--name", name, "--data-dir", str(data)]
        + ["--quiet"]
        + ([] if near_duplicates else ["--no-near-duplicates"]),
        work / f"prepare_{n}.log",
        # a cold run: no keypoints or verified pairs of an earlier run in the user's cache
        env={**os.environ, "AUTOML_CXR_CACHE": str(work / f"cache_{n}_{time.time_ns()}")},
    )
    meta = json.loads((data / name / "dataset.json").read_text())
    timings = meta.get("timings", {})
    row["prepare"] = {
        **prep,
        "ms_per_image": round(1000 * prep["wall_s"] / n, 2),
        **timings,
        "duplicate_share": round(timings.get("duplicates_s", 0) / prep["wall_s"], 3),
        "images_kept": meta["images"],
        "copies_merged": meta.get("copies_removed", 0),
    }
    print(f"  prepare {row['prepare']}", flush=True)
    save()
    db = work / f"study_{n}.db"
    # a fresh study: one left in a reused --work folder would be resumed, its trials counted
    for old in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        old.unlink(missing_ok=True)
    shutil.rmtree(work / f"study_{n}.artifacts", ignore_errors=True)
    search = run_measured(
        [*exe, "search", "--dataset", name, "--profile", "cpu", "--trials", str(trials)]
        + ["--data-dir", str(data), "--storage", str(db), "--quiet"],
        work / f"search_{n}.log",
    )
    import optuna

    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    done = [t for t in study.trials if t.state.is_finished()]
    row["search"] = {
        **search,
        "trials": len(done),
        "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in done),
        "s_per_trial": round(search["wall_s"] / max(1, len(done)), 1),
        "ms_per_trial_per_image": round(1000 * search["wall_s"] / max(1, len(done)) / n, 3),
        "ms_per_trial_per_row": round(
            1000 * search["wall_s"] / max(1, len(done)) / row["prepare"]["images_kept"], 3
        ),
    }
    print(f"  search {row['search']}", flush=True)
    save()
    rep = run_measured(
        [*exe, "report", str(db), "--out", str(work / f"report_{n}")], work / f"report_{n}.log"
    )
    page = work / f"report_{n}" / "index.html"
    row["report"] = {**rep, "page_mb": round(page.stat().st_size / 1e6, 2)}
    print(f"  report {row['report']}", flush=True)
    # this size's films only (a larger run in the same folder re-uses and adds to them)
    names = [line.split(",", 1)[0] for line in csv.read_text().splitlines()[1:]]
    row["disk_gb"] = round(sum((csv.parent / f).stat().st_size for f in names) / 2**30, 2)
    save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,10000,50000")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--near-duplicates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prepare with the search for re-framed copies (default) or byte copies only",
    )
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "scale.json")
    args = ap.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="automl-cxr-scale-"))
    rows = []

    def save() -> None:  # after every stage: a long run that stops keeps what it measured
        args.json.write_text(
            json.dumps(
                {
                    "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                    f"{platform.platform()}",
                    "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )

    try:
        for n in sizes:
            print(f"N = {n}", flush=True)
            rows.append({"images": n})
            measure(n, work, args.trials, rows[-1], save, args.near_duplicates)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
