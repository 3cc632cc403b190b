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

import argparse
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
ALL_SITE_STUDIES = (  # every site-CV study of ROBUST.md, for --kinds fold (2026-12-07, eleventh)
    "none_site",
    "roi_site",
    "intensity_site",
    "adversarial_site",
    "robust_site",
    "balance_site",
    "none_rerun_site",
    "dro_site",
    "robust_dro_site",
    "lite2_site",
    "resolution_site",
)
ROUNDS = 20
KINDS = {  # what `export` is asked for -> its extra arguments (the retrain's stop named: the
    # rows before 2026-12-07, eleventh session, ran when cv_epochs was export's only rule)
    "best trial, cv_epochs stop": ["--retrain-stop", "cv_epochs"],
    "best trial, inner stop": ["--retrain-stop", "inner"],
    "fold ensemble": ["--ensemble"],
    f"ensemble-select {ROUNDS}, cv_epochs stop": [
        "--ensemble-select",
        str(ROUNDS),
        "--retrain-stop",
        "cv_epochs",
    ],
    f"ensemble-select {ROUNDS}, inner stop": [
        "--ensemble-select",
        str(ROUNDS),
        "--retrain-stop",
        "inner",
    ],
}


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


def stop_table(rows: list[dict]) -> str:
    """One trial, four objects: the search's own fold models (its stored external figures),
    the export retrained with each stop rule, and the exported fold ensemble (cohen_sites /
    adult_holdout / nih_holdout balanced accuracy)."""
    kinds = ("best trial, cv_epochs stop", "best trial, inner stop", "fold ensemble")
    by = {(r["study"], r["model"]): r for r in rows}
    lines = [
        "| study | trial | search's fold models | retrained, cv_epochs stop | "
        "retrained, inner stop | fold ensemble (export --ensemble) |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]

    def cell(vals: list[float | None]) -> str:
        return " / ".join("–" if v is None else f"{v:.3f}" for v in vals)

    for study in dict.fromkeys(r["study"] for r in rows):
        got = [by.get((study, k)) for k in kinds]
        if not all(got):
            continue
        search = next((g.get("search_fold_models") for g in got if g.get("search_fold_models")), {})
        cells = [cell([search.get(n) for n in EXTERNALS])]
        cells += [cell([g[n]["balanced_accuracy"] for n in EXTERNALS]) for g in got]
        lines.append(f"| {study} | {got[0]['trial']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _search_figures(db: str, trial: int) -> dict:
    """The search's own external figures for `trial`: its fold models, averaged."""
    import optuna

    from automl_cxr.study import external_attr_key, load_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    attrs = load_study(db).trials[trial].user_attrs
    return {
        name: attrs.get(external_attr_key(name, "balanced_accuracy"))
        for name in EXTERNALS
        if attrs.get(external_attr_key(name, "balanced_accuracy")) is not None
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", nargs="?", type=Path, default=Path("data/generalisation"))
    ap.add_argument("studies", nargs="*", help=f"default: {' '.join(STUDIES)}")
    ap.add_argument(
        "--kinds",
        nargs="+",
        choices=list(KINDS),
        default=["best trial, inner stop", f"ensemble-select {ROUNDS}, inner stop"],
        help="what to export per study (default: the best trial and the selected ensemble)",
    )
    args = ap.parse_args(argv)
    data_dir, studies = args.data_dir, args.studies or list(STUDIES)
    path = HERE / "ensemble_probe.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    done = {(r["study"], r["model"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for study in studies:
            db = str(HERE / f"{study}.db")
            for kind in args.kinds:
                extra = KINDS[kind]
                if (study, kind) in done:
                    continue
                out = Path(tmp) / f"{study}-{list(KINDS).index(kind)}"
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
                row["search_fold_models"] = _search_figures(db, row["trial"])
                row.update(_evaluate(out, data_dir))
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
                (HERE / "ensemble_probe.md").write_text(table(rows) + "\n" + stop_table(rows))
                path.write_text(
                    json.dumps({"rounds": ROUNDS, "rows": rows}, indent=2, default=str) + "\n"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
