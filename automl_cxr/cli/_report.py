"""`automl-cxr report` and `automl-cxr dashboard`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from automl_cxr.cli import app
from automl_cxr.cli._common import err_console, name_lines, out_console


def _num(x, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def _ci(lo, hi, spec: str = ".3f") -> str:
    return "" if lo is None or hi is None or lo != lo or hi != hi else f"[{lo:{spec}}–{hi:{spec}}]"


def _compact_table(title: str) -> Table:
    """A borderless table with underlined headers: the console report's style, 80 columns."""
    return Table(
        title=title,
        title_justify="left",
        header_style="bold underline",
        box=None,
        pad_edge=False,
        padding=(0, 1),
    )


def _external_table(data) -> Table:
    """The top trials' CV score beside each external set's figure, in 80 columns (set names
    wrap in their headers; numbers never do)."""
    board = data.board.head(data.top)
    table = _compact_table(f"generalisation: {data.metric} by cross-validation vs external sets")
    table.add_column("trial", justify="right", no_wrap=True)
    table.add_column("CV", justify="right", no_wrap=True)
    for name in data.externals:
        table.add_column(name_lines(name, 14), justify="right", overflow="fold", min_width=6)
    table.add_column("gap", justify="right", no_wrap=True)
    first = f"ext_{data.externals[0]}"
    for r in board.to_dict(orient="records"):
        gap = r["value"] - r.get(first, float("nan"))
        table.add_row(
            str(r["number"]),
            _num(r["value"], ".3f"),
            *(_num(r.get(f"ext_{n}"), ".3f") for n in data.externals),
            _num(gap, "+.3f"),
        )
    return table


def _console_table(data) -> Table:
    """The leaderboard in 80 columns: numbers never cut (their columns do not wrap), the
    configuration (backbone, frozen depth, head) wraps in the last column. The full table is
    in the files."""
    board = data.board.head(data.top)
    table = _compact_table(
        f"top {len(board)} of {len(data.board)} ranked by {data.metric} (mean over {data.folds})"
    )
    for name, justify in (
        ("#", "right"),
        ("", "left"),
        ("trial", "right"),
        ("score", "right"),
        ("95% CI", "right"),
        ("sens", "right"),
        ("spec", "right"),
        ("ECE", "right"),
        ("ms", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column(
        "backbone / frozen / head", justify="left", overflow="fold", ratio=1, min_width=16
    )
    rows = []
    for r in board.to_dict(orient="records"):
        mark = {True: "≈", False: "", None: "?"}[r["not_worse"]]
        cells = [
            str(r["rank"]),
            mark,
            str(r["number"]),
            _num(r["value"], ".4f"),
            _ci(r["ci_low"], r["ci_high"]) or "-",
            _num(r["covid_sensitivity"], ".3f"),
            _num(r["covid_specificity"], ".3f"),
            _num(r.get("ece"), ".3f"),
            _num(r["latency_ms"], ".1f"),
        ]
        rows.append((cells, f"{r['backbone']} {r['frozen_depth'] or '-'} {r['head']}", r))
    # Break a backbone name (after its `_`) only when the last column is narrower than it.
    room = _room([str(col.header) for col in table.columns[:-1]], [c for c, _, _ in rows])
    for cells, config, r in rows:
        table.add_row(*cells, name_lines(config, room), style="green" if r["not_worse"] else None)
    return table


def _room(headers: list[str], rows: list[list[str]], *, edges: int = 0, floor: int = 16) -> int:
    """Characters left on the console for a table's remaining column, after the columns given
    by their headers and cells (each as wide as its widest line, one space of padding on each
    side) and `edges` characters of border."""
    widths = [
        max([len(h)] + [len(line) for row in rows for line in row[i].split("\n")])
        for i, h in enumerate(headers)
    ]
    return max(floor, out_console.width - sum(widths) - 2 * len(widths) - edges)


_PAPER_HEADERS = ("accuracy", "COVID acc.", "COVID sens.", "COVID spec.")


def _paper_table(data) -> Table:
    """Ours beside the seed paper's reported numbers, in 80 columns: each cell is the value in
    percent with its 95 % CI over folds on the line below; row labels wrap."""
    from automl_cxr.report._paper import PAPER_KEYS

    table = Table(
        title=f"Beside the seed paper (percent; ours: mean [95% CI] over {data.folds})",
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    table.add_column("", justify="left", overflow="fold", ratio=1, min_width=16)
    table.add_column("trial", justify="right", no_wrap=True)
    for name in _PAPER_HEADERS:
        table.add_column(name, justify="right", no_wrap=True)
    rows = []
    for r in data.paper.to_dict(orient="records"):
        label = str(r["row"])
        if r["source"] != "paper" and r.get("backbone") and str(r["backbone"]) not in label:
            label += f" ({r['backbone']})"
        elif r["source"] == "paper" and r.get("backbone"):
            label += f", {r['backbone']}"
        cells = []
        for k in PAPER_KEYS:
            v, lo, hi = r[k], r[f"{k}_ci_low"], r[f"{k}_ci_high"]
            if v is None or v != v:
                cells.append("-")
                continue
            ci = _ci(None if lo != lo else 100 * lo, None if hi != hi else 100 * hi, ".1f")
            cells.append(f"{100 * v:.2f}%" + (f"\n{ci}" if ci else ""))
        trial = r["trial"]
        trial = "-" if trial is None or trial != trial else str(int(trial))
        rows.append((label, [trial, *cells], r["source"] == "paper"))
    # the label column gets what the numbers leave; a name breaks after `_` only beyond that
    room = _room([str(col.header) for col in table.columns[1:]], [c for _, c, _ in rows], edges=2)
    for label, cells, paper in rows:
        table.add_row(name_lines(label, room), *cells, style="cyan" if paper else None)
    return table


def _print_report(data, files: list[Path]) -> None:
    from automl_cxr.report._paper import paper_caveat
    from automl_cxr.report._tables import (
        counts_text,
        describe_test_split,
        ensemble_text,
        mark_legend,
    )

    c = out_console
    c.print(f"[bold]study[/] {data.study_name}  ({data.storage})", highlight=False, soft_wrap=False)
    c.print(f"trials: {counts_text(data.counts)}", highlight=False)
    if data.warning:
        err_console.print(
            f"[bold yellow]warning (shortcut risk, Cramér's V = {data.cramers_v}):[/] "
            f"{data.warning}",
            highlight=False,
        )
    if data.counts.get("RUNNING"):
        c.print(
            f"[yellow]the study is still running ({data.counts['RUNNING']} trial(s)); "
            "this report is a snapshot[/]"
        )
    c.print(_console_table(data))
    prose = {"highlight": False, "style": "dim", "soft_wrap": False}
    c.print(
        "columns: score and its 95% CI over folds; COVID-19 sensitivity and specificity; "
        "ECE (calibration error of the out-of-fold probabilities); latency in ms.",
        **prose,
    )
    c.print(mark_legend(data).replace("≈ best", "≈").replace("n/a:", "?:"), **prose)
    if data.externals:
        c.print(_external_table(data))
        c.print(
            "external sets: the trial's fold models on data the search never chose on "
            f"(bootstrap CIs in the files); gap = CV - {data.externals[0]}.",
            **prose,
        )
    for line in describe_test_split(data):
        c.print(line, highlight=False)
    for line in ensemble_text(data):
        c.print(line, highlight=False, soft_wrap=False)
    if len(data.paper):
        c.print(_paper_table(data))
        c.print(paper_caveat(data.folds), **prose)
    for note in data.notes:
        c.print(f"note: {note}", **prose)
    if files:
        folder = files[0].parent
        page = folder / "index.html"
        c.print(
            f"wrote {len(files)} files to {folder}/" + (f"; open {page}" if page in files else ""),
            highlight=False,
            soft_wrap=False,
        )


@app.command("report")
def report(
    study: Annotated[str, typer.Argument(help="SQLite file path or Optuna storage URL.")],
    study_name: Annotated[
        str | None, typer.Option(help="Study to report (default: the only one in the storage).")
    ] = None,
    metric: Annotated[
        str | None, typer.Option(help="Metric to rank by (default: the study's objective).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: dashboards/<study name>/).")
    ] = None,
    top: Annotated[
        int,
        typer.Option(
            help="Leaderboard rows in the console, Markdown and page (the CSV has all); confusion "
            "matrices and ROC curves show the first min(K, 4)."
        ),
    ] = 10,
    compare: Annotated[
        str | None, typer.Option(help="Another study (path/URL) to compare best per backbone.")
    ] = None,
    compare_study_name: Annotated[
        str | None, typer.Option(help="Study in --compare's storage (default: the only one).")
    ] = None,
    alpha: Annotated[
        float, typer.Option(help="Level of the 'not significantly worse than the best' test.")
    ] = 0.05,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the leaderboard as JSON on stdout; files are "
            "written only when --out is given.",
        ),
    ] = False,
    html: Annotated[bool, typer.Option("--html/--no-html", help="Write index.html.")] = True,
    operating_point: Annotated[
        str,
        typer.Option(
            "--operating-point",
            help="Operating point on the positive class marked on the ROC curves and "
            "tabulated: youden, sensitivity=X or specificity=X (out-of-fold).",
        ),
    ] = "youden",
) -> None:
    """Leaderboard, groupings, paper-style table and an interactive page for a study."""
    from automl_cxr.errors import ConfigError
    from automl_cxr.oof import parse_operating_point
    from automl_cxr.report import load_report, make_report

    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), but got {alpha}")
    parse_operating_point(operating_point)  # a bad value fails before any work
    common = dict(
        study_name=study_name,
        metric=metric,
        top=top,
        alpha=alpha,
        compare=compare,
        compare_study_name=compare_study_name,
        operating_point=operating_point,
    )
    if as_json and out is None:  # --json alone writes nothing
        data, files = load_report(study, **common), []
    else:
        data, files = make_report(study, out=out, html=html, **common)
    if as_json:
        if files:
            err_console.print(f"wrote {len(files)} files to {out}/", highlight=False)
        if data.warning:
            err_console.print(
                f"[bold yellow]warning (shortcut risk):[/] {data.warning}", highlight=False
            )
        print(json.dumps(data.summary(), indent=2))
        return
    _print_report(data, files)


@app.command("dashboard")
def dashboard(
    study: Annotated[str, typer.Argument(help="SQLite file path or Optuna storage URL.")],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 for others).")] = "127.0.0.1",
    publish: Annotated[
        bool,
        typer.Option(
            "--publish/--no-publish",
            help="First write a note and figure artifacts for every complete trial not yet "
            "published, and the report's key figures on the study page.",
        ),
    ] = True,
    force: Annotated[
        bool, typer.Option("--republish", help="Publish every trial again (new notes/images).")
    ] = False,
) -> None:
    """Start optuna-dashboard on a study's storage (Ctrl-C stops it): trial notes (per-fold
    tables, per-class sensitivity/specificity, calibration), images and the report's figures."""
    from optuna_dashboard import run_server

    from automl_cxr.errors import ConfigError, StorageError
    from automl_cxr.study import open_storage, storage_url, study_names

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, but got {port}")
    storage = open_storage(study, create=False)
    try:
        names = study_names(storage)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot read studies from {storage_url(study)!r}: {msg}") from None
    if not names:
        raise StorageError(f"no study in {storage_url(study)!r}: run `automl-cxr search` first")
    from automl_cxr.oof import artifact_store

    if publish:
        import optuna

        from automl_cxr.report._dashboard import publish_dashboard

        for name in sorted(names):
            res = publish_dashboard(
                optuna.load_study(study_name=name, storage=storage), study, force=force
            )
            err_console.print(
                f"study {name}: published {len(res['published'])} trial(s) "
                f"({res['skipped']} already), figures {', '.join(res['figures']) or 'unchanged'}",
                highlight=False,
            )
            for problem in res.get("problems") or []:
                err_console.print(f"warning: study {name}: {problem}", highlight=False)
    store = artifact_store(study)
    err_console.print(
        f"optuna-dashboard on http://{host}:{port}/dashboard for {storage_url(study)} "
        f"({len(names)} stud{'y' if len(names) == 1 else 'ies'}: {', '.join(sorted(names))}; "
        "Ctrl-C stops it)",
        highlight=False,
    )
    try:
        run_server(storage, host=host, port=port, artifact_store=store)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
