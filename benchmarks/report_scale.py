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

Render times: a probe script records the `load` event (every inline Plotly figure drawn) and
`first-contentful-paint` (Paint Timing API, when the browser painted before load) on the page's
own clock and writes them into the title, which `chromium --headless --dump-dom` prints; and a
headless screenshot's wall time minus a blank page's (Chromium's start-up taken out).
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
_PROBE = (
    "<script>window.addEventListener('load',function(){setTimeout(function(){"
    "var p=performance.getEntriesByName('first-contentful-paint')[0];"
    "document.title='TIMING '+JSON.stringify({fcp:p?p.startTime:null,"
    "load:performance.now()})},0)});</script>"
)


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


def _chromium(args: list[str], tmp: Path) -> tuple[float, str]:
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
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")},
    )
    return time.perf_counter() - t0, proc.stdout


def _render(page: Path, tmp: Path) -> dict:
    """`load_s`: the page's own clock at its load event (every inline figure drawn);
    `first_paint_s`: first-contentful-paint when the browser painted before load (else None:
    the first paint came after the figures); `screenshot_s`: wall time of a headless screenshot
    of the page minus that of a blank page (Chromium's start-up taken out), an upper bound on
    the time to a painted first screen."""
    if not CHROMIUM.exists():
        return {"skipped": f"{CHROMIUM} missing"}
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    wall, dom = _chromium(["--dump-dom", probe.as_uri()], tmp)
    probe.unlink()
    m = re.search(r"TIMING (\{.*?\})</title>", dom)
    timing = json.loads(m.group(1).replace("&quot;", '"')) if m else {}
    blank = page.with_name("blank.html")
    blank.write_text("<html><body>blank</body></html>")
    shots = {}
    for name, target in (("blank", blank), ("page", page)):
        shots[name], _ = _chromium([f"--screenshot={tmp / (name + '.png')}", target.as_uri()], tmp)
    blank.unlink()
    return {
        "first_paint_s": None if timing.get("fcp") is None else round(timing["fcp"] / 1000, 2),
        "load_s": None if timing.get("load") is None else round(timing["load"] / 1000, 2),
        "screenshot_s": round(shots["page"] - shots["blank"], 2),
        "chromium_wall_s": round(wall, 2),
    }


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
