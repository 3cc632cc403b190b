"""How the report grows with the number of trials (issue 26 §1): page size, time to build it,
and time to first paint and to a loaded page in headless Chromium, at 25 to 200 trials.

    python benchmarks/report_scale.py [--seed-trials 12] [--sizes 25,50,100,200]
        [--data-dir DIR] [--json benchmarks/report_scale.json]

A real smoke-profile search on the shared data (`three_class`, `--seed-trials` trials, complete
and pruned as Hyperband decides) gives trials with everything a trial carries (per-fold scores,
curves, confusion matrices, out-of-fold predictions, latency, feature-cache records); the
studies of each size are that study's trials repeated (params, values, user attributes and the
same out-of-fold artifact), so every trial costs the page what a real one costs. The
figures' content repeats; their size and the work to draw them do not depend on it.

Render times: a probe script logs to the console when the page starts, when it first paints
content (Paint Timing API), at `load`, and when every figure is drawn; headless Chromium stamps
each console line with the wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial

from automl_cxr.data import load_dataset, prepare_recipes
from automl_cxr.report import make_report
from automl_cxr.settings import default_sources_dir
from automl_cxr.study import SearchSettings, run_search

CHROMIUM = Path("/usr/bin/chromium")
# Logs to the console (Chromium writes each line to stderr with a wall-clock stamp) when the
# page starts, paints its first content, fires `load`, and has every figure drawn.
_PROBE = (
    "<script>console.log('PROBE start');new PerformanceObserver(function(l){"
    "l.getEntries().forEach(function(e){if(e.name=='first-contentful-paint'){"
    "console.log('PROBE first_paint')}})}).observe({type:'paint',buffered:true});"
    "function chk(){var n=document.querySelectorAll('.plot').length,"
    "d=document.querySelectorAll('.plot .main-svg').length;"
    "if(d>=n){console.log('PROBE figures_drawn')}else{setTimeout(chk,20)}}"
    "window.addEventListener('load',function(){console.log('PROBE load');chk()});</script>"
)
_STAMP = re.compile(r"/(\d{2})(\d{2})(\d{2})\.(\d{6}):.*PROBE (\w+)")


def _seed_study(db: Path, data_dir: Path, trials: int) -> optuna.Study:
    try:
        load_dataset("three_class", data_dir)
    except Exception:
        src = default_sources_dir()
        prepare_recipes(
            cohen=src / "cohen", kermany=src / "kermany", data_dir=data_dir, recipes=["three_class"]
        )
    run_search(
        SearchSettings(
            dataset="three_class",
            trials=trials,
            data_dir=data_dir,
            storage=str(db),
            profile="smoke",
            seed=0,
        )
    )
    (name,) = optuna.get_all_study_names(f"sqlite:///{db}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def _grow(study: optuna.Study, seed: list, size: int) -> None:
    """Add copies of the seed trials until the study holds `size` finished trials."""
    i = len(study.get_trials(deepcopy=False))
    while i < size:
        t = seed[i % len(seed)]
        study.add_trial(
            create_trial(
                state=t.state,
                value=t.value if t.state == TrialState.COMPLETE else None,
                params=t.params,
                distributions=t.distributions,
                user_attrs=t.user_attrs,
                intermediate_values=t.intermediate_values,
            )
        )
        i += 1


def _render(page: Path, tmp: Path) -> dict:
    """Seconds from the page's first script to its first contentful paint, its `load` event and
    its last figure drawn, from the wall-clock stamps of Chromium's console log (a real clock:
    `--virtual-time-budget` only lets the page's timers run to the end)."""
    if not CHROMIUM.exists():
        return {"skipped": f"{CHROMIUM} missing"}
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-unsafe-swiftshader",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={tmp / 'profile'}",
            "--window-size=1280,900",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=120000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")},
    )
    wall = time.perf_counter() - t0
    probe.unlink()
    stamps: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = _STAMP.search(line)
        if m:
            h, mi, sec, us, what = m.groups()
            stamps.setdefault(what, int(h) * 3600 + int(mi) * 60 + int(sec) + int(us) / 1e6)
    start = stamps.get("start")
    out = {
        k: (round(stamps[k] - start, 2) if start is not None and k in stamps else None)
        for k in ("first_paint", "load", "figures_drawn")
    }
    return {**{f"{k}_s": v for k, v in out.items()}, "chromium_wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed-trials", type=int, default=12)
    ap.add_argument("--sizes", default="25,50,100,200")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/report_scale.json"))
    args = ap.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        data_dir = args.data_dir or tmp / "data"
        db = tmp / "study.db"
        t0 = time.perf_counter()
        study = _seed_study(db, data_dir, args.seed_trials)
        seed = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        ]
        print(f"seed study: {len(seed)} trials in {time.perf_counter() - t0:.0f} s", flush=True)
        for size in sizes:
            _grow(study, seed, size)
            out = tmp / f"report{size}"
            t1 = time.perf_counter()
            _, files = make_report(str(db), out=out)
            build = time.perf_counter() - t1
            page = out / "index.html"
            row = {
                "trials": size,
                "complete": len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
                "report_s": round(build, 2),
                "page_mb": round(page.stat().st_size / 1e6, 2),
                "folder_mb": round(sum(f.stat().st_size for f in files) / 1e6, 2),
                **_render(page, tmp),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "command": "python benchmarks/report_scale.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
