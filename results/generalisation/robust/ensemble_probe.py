"""Does an ensemble of a site-CV search's trials hold up better in a new hospital? (2026-12-07)

One trial's site-CV value moves more between fold seeds than the trials differ (§5), so the
single best trial is partly the luckiest draw. Averaging several trials' models is the usual
answer to a noisy winner, and the product has it: `export --ensemble-select N` runs Caruana
ensemble selection over the study's stored out-of-fold predictions (with a nested estimate of
the selected ensemble's own score, so the selection is not scored on what chose it), retrains
the members and writes one graph. Here, exactly as a user would, for each site-CV study on
today's data: `export` of the best trial and `export --ensemble-select 20`, both retrained and
calibrated the same way, then `evaluate` of each on the three external sets (never seen by the
search, the selection or the export).

    python results/generalisation/robust/ensemble_probe.py [DATA_DIR] [STUDY ...]

Writes ensemble_probe.json (and .md) beside this file; the exported models go to a temporary
folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXT = HERE.parent / "external"
EXTERNALS = ("cohen_sites_binary", "adult_holdout_binary", "nih_holdout_binary")
STUDIES = ("none_rerun_site", "robust_dro_site", "dro_site", "lite2_site", "resolution_site")
ROUNDS = 20


def _cli(*args: str) -> dict:
    out = subprocess.run(
        ["automl-cxr", *args, "--json", "-q"], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"automl-cxr {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def _evaluate(model: Path, data_dir: Path) -> dict:
    res = {}
    for name in EXTERNALS:
        d = _cli(
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(EXT / f"{name}.csv"),
            "--data-dir",
            str(data_dir),
        )
        b = d["bootstrap"]["metrics"]["balanced_accuracy"]
        res[name] = {
            "n": d["metrics"]["n"],
            "balanced_accuracy": d["metrics"]["balanced_accuracy"],
            "ci": [b["ci_low"], b["ci_high"]],
            "auc": d["metrics"].get("auc"),
        }
    return res


def table(rows: list[dict]) -> str:
    """The markdown table of ROBUST.md from the recorded rows."""
    lines = [
        "| study | model | site CV (nested for the ensemble) | cohen_sites [95 % CI] | "
        "cohen_sites AUC | adult_holdout | nih_holdout |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("members"):
            n = len(r["members"])
            est = r["nested"]["ensemble"]["mean"] if r.get("nested") else float("nan")
            model = f"{r['model']} ({n} member{'s' if n > 1 else ''})"
        else:
            est, model = r["trial_value"], f"{r['model']} (#{r['trial']})"
        c = r["cohen_sites_binary"]
        lines.append(
            f"| {r['study']} | {model} | {est:.3f} | {c['balanced_accuracy']:.3f} "
            f"[{c['ci'][0]:.3f}–{c['ci'][1]:.3f}] | {c['auc']:.3f} | "
            f"{r['adult_holdout_binary']['balanced_accuracy']:.3f} | "
            f"{r['nih_holdout_binary']['balanced_accuracy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    data_dir = Path(argv[0]) if argv else Path("data/generalisation")
    studies = argv[1:] or list(STUDIES)
    path = HERE / "ensemble_probe.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    done = {(r["study"], r["model"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for study in studies:
            db = str(HERE / f"{study}.db")
            for kind, extra in (
                ("best trial", []),
                (f"ensemble-select {ROUNDS}", ["--ensemble-select", str(ROUNDS)]),
            ):
                if (study, kind) in done:
                    continue
                out = Path(tmp) / f"{study}-{len(extra)}"
                t0 = time.perf_counter()
                exp = _cli(
                    "export", "--study", db, "--data-dir", str(data_dir), "--out", str(out), *extra
                )
                row = {"study": study, "model": kind, "export_seconds": time.perf_counter() - t0}
                sel = exp.get("selected_ensemble")
                if sel:  # its members, in-sample score and nested estimate (site CV)
                    row.update({k: sel.get(k) for k in ("members", "score", "nested", "caveat")})
                row["trial"] = exp["study"]["trial"]
                row["trial_value"] = exp["study"]["values"][0]
                row.update(_evaluate(out, data_dir))
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
                (HERE / "ensemble_probe.md").write_text(table(rows))
                path.write_text(
                    json.dumps({"rounds": ROUNDS, "rows": rows}, indent=2, default=str) + "\n"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
