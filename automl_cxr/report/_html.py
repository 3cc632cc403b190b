"""The self-contained interactive page: tables as HTML, figures as Plotly, plotly.js inlined.

The page loads nothing from the network: plotly.js sits in a ``<script>`` element of the page
itself, the figures' JSON in a ``<script type="application/json">`` element, and the styles in
a ``<style>`` element. It opens offline, from a file, in any current browser.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import plotly
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from automl_cxr.report._data import ReportData
from automl_cxr.report._figures import FIGURE_TITLES
from automl_cxr.report._paper import paper_caveat
from automl_cxr.report._records import STATES
from automl_cxr.report._tables import (
    OPERATING_NOTE,
    calibration_legend,
    compare_rows,
    counts_text,
    describe_test_split,
    ensemble_rows,
    ensemble_text,
    group_rows,
    leaderboard_rows,
    mark_legend,
    operating_rows,
    paper_rows,
)

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0 0 6px;font-size:1.5rem}
header .meta{font-size:.9rem;opacity:.85}
main{padding:12px 28px 40px;max-width:1500px}
nav{font-size:.9rem;margin:10px 0 4px}
nav a{margin-right:12px;color:#2457a6;text-decoration:none}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px;
margin:14px 0}
section h2{font-size:1.15rem;margin:4px 0 10px}
.counts span{display:inline-block;padding:2px 10px;border-radius:10px;margin-right:6px;
font-size:.85rem;font-weight:600;color:#fff}
.st-COMPLETE{background:#1f77b4}.st-PRUNED{background:#ff7f0e}.st-FAIL{background:#d62728}
.st-RUNNING{background:#2ca02c}.st-WAITING{background:#7f7f7f}
.warning{background:#fff4e5;border:2px solid #e8590c;border-radius:6px;padding:12px 16px;
margin:14px 0;font-size:.95rem}
.warning strong{color:#c2410c}
.note{font-size:.85rem;color:#4a5261;margin:8px 0 0}
table{border-collapse:collapse;font-size:.85rem;width:100%}
th,td{border-bottom:1px solid #e5e8ec;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.eq td{background:#eef6ee}
tr.paper td{background:#f3effa;font-style:italic}
.mark{color:#1b7f3b;font-weight:700;white-space:nowrap}
.params{font-size:.75rem;color:#4a5261;overflow-wrap:anywhere}
tr.lead td{border-bottom:none}
.ci{font-size:.75rem;color:#4a5261;white-space:nowrap}
.plot{width:100%;min-height:300px}
details summary{cursor:pointer;margin:8px 0;color:#2457a6}
"""

_JS = """
(function () {
  var figs = JSON.parse(document.getElementById('figure-data').textContent);
  var config = {responsive: true, displaylogo: false, showLink: false,
                modeBarButtonsToRemove: ['sendDataToCloud']};
  var keys = Object.keys(figs);
  // The text and tables paint first; then one figure per frame, in page order, so the page
  // is readable at once and stays responsive while the figures are drawn.
  function draw(i) {
    if (i >= keys.length) { return; }
    var el = document.getElementById('plot-' + keys[i]);
    try {
      Plotly.newPlot(el, figs[keys[i]].data, figs[keys[i]].layout, config);
    } catch (err) {
      el.textContent = 'This figure could not be drawn: ' + err;
      console.error('figure ' + keys[i] + ': ' + err);
    }
    setTimeout(function () { draw(i + 1); }, 0);
  }
  requestAnimationFrame(function () { setTimeout(function () { draw(0); }, 0); });
})();
"""


def _e(x: Any) -> str:
    return html.escape("-" if x is None else str(x), quote=True)


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    numeric: Sequence[int] = (),
    row_class: Sequence[str] | None = None,
    row_title: Sequence[str] | None = None,
    extra: Sequence[str] | None = None,
    extra_header: str | None = None,
) -> str:
    """An HTML table. A numeric cell "x [lo, hi]" shows its interval on a second line; `extra`
    (e.g. a trial's configuration) is a second row under each row, across every column, so a
    long text never squeezes a column (the leaderboard fits 1280 px: tested in Chromium)."""
    num = set(numeric)
    width = len(header)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, c in enumerate(row):
            if j == 1 and header[1] == "" and c:
                cells.append(f'<td class="mark">{_e(c)}</td>')
            elif j in num:
                text = _e(c)
                if " [" in text:  # estimate, then its interval below it
                    est, ci = text.split(" [", 1)
                    text = f'{est}<br><span class="ci">[{ci}</span>'
                cells.append(f'<td class="num">{text}</td>')
            else:
                cells.append(f"<td>{_e(c)}</td>")
        cls = row_class[i] if row_class and row_class[i] else ""
        title = f' title="{_e(row_title[i])}"' if row_title else ""
        lead = " lead" if extra is not None else ""
        attr = f' class="{cls}{lead}"' if cls or lead else ""
        body.append(f"<tr{attr}{title}>{''.join(cells)}</tr>")
        if extra is not None:
            label = f"{_e(extra_header)}: " if extra_header else ""
            sub = f"{cls} sub".strip()
            body.append(
                f'<tr class="{sub}"><td></td><td colspan="{width - 1}" '
                f'class="params">{label}{_e(extra[i])}</td></tr>'
            )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _leaderboard_html(data: ReportData) -> str:
    header, rows = leaderboard_rows(data)
    board = data.board
    cls = ["eq" if v is True else "" for v in board["not_worse"]]
    titles = list(board["params_text"])
    numeric = (0, 2, 3, 4, 5, 6, 10, 11, 12, *range(13, 13 + len(data.externals)))
    k = data.top
    main = _table(
        header,
        rows[:k],
        numeric=numeric,
        row_class=cls[:k],
        row_title=titles[:k],
        extra=titles[:k],
        extra_header="parameters",
    )
    out = [main]
    if len(rows) > k:
        out.append(
            f"<details><summary>all {len(rows)} ranked trials</summary>"
            + _table(
                header,
                rows,
                numeric=numeric,
                row_class=cls,
                row_title=titles,
                extra=titles,
                extra_header="parameters",
            )
            + "</details>"
        )
    out.append(f'<p class="note">{_e(mark_legend(data))}</p>')
    if data.oof is not None and data.oof.n_stored:
        out.append(f'<p class="note">{_e(calibration_legend())}</p>')
    for n in data.notes:
        out.append(f'<p class="note">{_e(n)}</p>')
    return "".join(out)


def _figure_json(figures: Mapping[str, go.Figure]) -> str:
    parts = [f"{json.dumps(k)}:{fig.to_json()}" for k, fig in figures.items()]
    text = "{" + ",".join(parts) + "}"
    # Inside <script>: no "</script>" or "<!--" may appear; "\/" is a valid JSON escape.
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def render_html(data: ReportData, figures: Mapping[str, go.Figure]) -> str:
    """The whole page as one string (plotly.js inlined; opens offline)."""
    a = data.attrs
    profile = a.get("profile")
    profile = profile.get("name") if isinstance(profile, dict) else profile
    title = f"automl-cxr report: {data.study_name}"
    counts = "".join(
        f'<span class="st-{s}">{data.counts.get(s, 0)} {s.lower()}</span>'
        for s in STATES
        if s != "WAITING" or data.counts.get(s)
    )
    sections: list[str] = []
    toc = [
        ("leaderboard", "Leaderboard"),
        ("groups", "Best per group"),
        ("paper", "Beside the paper"),
    ]
    if data.compare is not None:
        toc.append(("compare-table", f"vs {data.compare_name}"))
    toc += [(f"fig-{k}", FIGURE_TITLES[k]) for k in figures]

    warning = ""
    if data.warning:
        warning = (
            '<div class="warning" id="shortcut-warning"><strong>⚠ Shortcut risk — '
            f"source–label alignment (Cramér's V = {_e(data.cramers_v)}):</strong> "
            f"{_e(data.warning)}</div>"
        )
    running = ""
    if data.counts.get("RUNNING"):
        running = (
            f'<p class="note">The study is still running ({data.counts["RUNNING"]} '
            "trial(s)); this page is a snapshot. Build it again for newer results.</p>"
        )

    sections.append(
        f'<section id="leaderboard"><h2>Leaderboard — ranked by {_e(data.metric)} '
        f"(mean over {_e(data.folds)}, 95 % CI)</h2>{_leaderboard_html(data)}</section>"
    )
    groups = []
    for name, frame, by in (
        ("backbone", data.by_backbone, "backbone"),
        ("frozen depth", data.by_frozen, "frozen_depth"),
        ("head design", data.by_head, "head"),
    ):
        h, r = group_rows(data, frame, by)
        groups.append(f"<h3>Best per {_e(name)}</h3>" + _table(h, r, numeric=(1, 2, 3, 4, 5, 6, 7)))
    sections.append(f'<section id="groups"><h2>Best per group</h2>{"".join(groups)}</section>')
    h, r = paper_rows(data)
    sections.append(
        '<section id="paper"><h2>Beside the seed paper</h2>'
        + _table(
            h,
            r,
            numeric=(1, 3, 4, 5),
            row_class=["paper" if s == "paper" else "" for s in data.paper["source"]]
            if len(data.paper)
            else None,
        )
        + f'<p class="note">{_e(paper_caveat(data.folds))}</p></section>'
    )
    h, r = operating_rows(data)
    if r:
        toc.insert(3, ("operating", "Operating point"))
        sections.append(
            f'<section id="operating"><h2>Operating point on '
            f"{_e(data.oof.operating[0]['positive'])} (out-of-fold)</h2>"
            + _table(h, r, numeric=(0, 2, 3, 4, 5))
            + f'<p class="note">{_e(OPERATING_NOTE)} The ROC figure marks it.</p></section>'
        )
    lines = describe_test_split(data)
    if lines:
        toc.insert(3, ("test", "Test split"))
        sections.append(
            '<section id="test"><h2>Test split (never seen by the search)</h2>'
            + "".join(f"<p>{_e(t)}</p>" for t in lines)
            + "</section>"
        )
    h, r = ensemble_rows(data)
    if r:
        toc.insert(4 if data.oof.operating else 3, ("ensemble", "Ensemble selection"))
        sections.append(
            '<section id="ensemble"><h2>Ensemble selection across trials</h2>'
            + _table(h, r, numeric=(0, 1, 2))
            + "".join(f'<p class="note">{_e(t)}</p>' for t in ensemble_text(data))
            + "</section>"
        )
    if data.compare is not None:
        h, r = compare_rows(data)
        sections.append(
            f'<section id="compare-table"><h2>Comparison: {_e(data.study_name)} vs '
            f"{_e(data.compare_name)} (best per backbone, {_e(data.metric)})</h2>"
            + _table(h, r, numeric=(1, 2, 3, 4, 5))
            + "</section>"
        )
    for key in figures:
        sections.append(
            f'<section id="fig-{key}"><div class="plot" id="plot-{key}"></div></section>'
        )

    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = (
        f"dataset {_e(a.get('dataset', '?'))} ({_e(', '.join(a.get('classes') or []))}) · "
        f"profile {_e(profile or '?')} · sampler {_e(a.get('sampler', '?'))} · "
        f"objectives {_e(', '.join(a.get('objectives') or []))} · storage {_e(data.storage)} · "
        f"generated {generated} · plotly.js {_e(plotly.__version__)}"
    )
    nav = "".join(f'<a href="#{_e(i)}">{_e(t)}</a>' for i, t in toc)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style>"
        "</head><body>"
        f'<header><h1>{_e(title)}</h1><div class="meta">{meta}</div></header><main>'
        f'<div class="counts" id="counts" title="{_e(counts_text(data.counts))}">{counts}</div>'
        f"{warning}{running}<nav>{nav}</nav>{''.join(sections)}</main>"
        # plotly.js (4.6 MB) after the content: the text paints before it is compiled
        f"<script>{get_plotlyjs()}</script>"
        f'<script type="application/json" id="figure-data">{_figure_json(figures)}</script>'
        f"<script>{_JS}</script></body></html>\n"
    )
