"""Console rendering for `evaluate`, `export`, `predict` and `diagnose`: metric tables with
confidence intervals and the shortcut diagnostics' verdicts (the commands are in `_deploy.py`)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from automl_cxr._numbers import clip01, fmt_num
from automl_cxr.cli._common import out_console

__all__ = ["ci_table", "ci_text", "metric_rows", "print_diagnose"]


def ci_text(lo: Any, hi: Any) -> str:
    """A 95% interval of a metric in [0, 1] (t-intervals over few folds are clipped to it)."""
    a, b = fmt_num(clip01(lo)), fmt_num(clip01(hi))
    return "-" if a == "-" or b == "-" else f"[{a}, {b}]"


def ci_table(title: str, rows) -> Table:
    """metric | value | 95% CI, one row each."""
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI", justify="right")
    for row in rows:
        t.add_row(*row)
    return t


def metric_rows(boot: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    metrics = boot.get("metrics") or {}
    from automl_cxr.engine import SCALAR_METRICS as order

    names = [m for m in order if m in metrics] + sorted(m for m in metrics if m not in order)
    for name in names:
        m = metrics[name]
        rows.append((name, fmt_num(m.get("estimate")), ci_text(m.get("ci_low"), m.get("ci_high"))))
    return rows


def print_diagnose(res: dict[str, Any]) -> None:
    c = out_console

    def say(text: str, **kw: Any) -> None:
        c.print(text, highlight=False, **kw)

    s = res["study"]
    say(
        f"[bold]shortcut diagnostics[/] of study {s['study']} trial {s['trial']} "
        f"(dataset {res['dataset']})"
    )
    al = res["alignment"]
    say(
        f"\n[bold]1. source-label alignment[/]: Cramér's V = {fmt_num(al['cramers_v'], '.2f')}"
        " (0 = independent, 1 = the source determines the label)"
    )
    classes = sorted({lab for row in al["contingency"].values() for lab in row})
    t = Table(box=None, padding=(0, 2))
    t.add_column("source")
    for lab in classes:
        t.add_column(lab, justify="right")
    for src, row in al["contingency"].items():
        t.add_row(src, *[str(row.get(lab, 0)) for lab in classes])
    c.print(t)
    pr = res["probe"]
    if pr.get("auc") is None:
        say(f"\n[bold]2. image-based source probe[/]: not run ({pr.get('note')})")
    else:
        folds = pr.get("auc_folds") or []
        spread = f", folds {min(folds):.2f}-{max(folds):.2f}" if folds else ""
        say(
            f"\n[bold]2. image-based source probe[/]: ROC-AUC {pr['auc']:.3f} predicting the "
            f"source from pixels ({pr['n_folds']} patient-grouped folds{spread}; 0.5 = chance, "
            f"warning at {pr['warn_at']})"
        )
        say(f"   {pr['method']}", style="dim")
    bs = res.get("by_source")
    say("\n[bold]3. out-of-fold metrics per source[/] (the trial's cross-validation)")
    if bs and bs["rows"]:
        t = Table(box=None, padding=(0, 2))
        for col in ("source", "images", "accuracy", "bal. acc.", "AUC"):
            t.add_column(col, justify="left" if col == "source" else "right")
        t.add_column("sensitivity (classes present)", overflow="fold")
        for r in bs["rows"]:
            t.add_row(
                r["source"],
                str(r["n"]),
                fmt_num(r["accuracy"]),
                fmt_num(r["balanced_accuracy"]),
                fmt_num(r["auc"]),
                ", ".join(f"{k} {fmt_num(v)}" for k, v in r["sensitivity"].items()),
            )
        c.print(t)
        if bs.get("note"):
            say(f"   note: {bs['note']}", style="dim")
    else:
        say("   not recorded for this trial")
    ctl = res.get("control")
    if ctl is None:
        say(
            "\n[bold]4. lung-blanked control run[/]: not run (add --control to retrain with the "
            "central lung field hidden)"
        )
    else:
        o, k = ctl["original"], ctl["control"]
        say(
            f"\n[bold]4. lung-blanked control run[/]: central {ctl['fraction']:.0%} x "
            f"{ctl['fraction']:.0%} blanked ({ctl['fill']}); {ctl['metric']}, mean and 95% CI "
            "over folds"
        )
        t = Table(box=None, padding=(0, 2))
        t.add_column("")
        t.add_column(ctl["metric"], justify="right")
        t.add_column("95% CI", justify="right")
        t.add_row("lungs visible", fmt_num(o["mean"]), ci_text(o["ci_low"], o["ci_high"]))
        t.add_row("lungs hidden", fmt_num(k["mean"]), ci_text(k["ci_low"], k["ci_high"]))
        t.add_row("chance", fmt_num(ctl["chance"]), "")
        c.print(t)
        style = {"likely_shortcut": "bold red", "partial": "yellow"}.get(ctl["verdict"])
        say(f"   verdict: {ctl['message']}", style=style)
    if not res["warnings"]:
        say("\n[green]no shortcut warning[/]: the source does not give the label away")
