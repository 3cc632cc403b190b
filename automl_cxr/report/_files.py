"""The report folder's files: Markdown, CSV and JSON of the leaderboard, groupings and the
paper-style table, and the all-or-nothing writer."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from automl_cxr.errors import StorageError
from automl_cxr.report._data import LEADERBOARD_COLUMNS, ReportData
from automl_cxr.report._paper import paper_caveat
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
    markdown_table,
    operating_rows,
    paper_rows,
)
from automl_cxr.study import json_safe

__all__ = [
    "REPORT_FILES",
    "clinic_markdown",
    "leaderboard_csv",
    "paper_table_markdown",
    "report_files",
    "report_markdown",
    "write_files",
]


def clinic_markdown(data: ReportData) -> str:
    """Calibration legend, operating points and the ensemble selection as Markdown."""
    if data.oof is None or not data.oof.n_stored:
        return ""
    out = [f"\n{calibration_legend()}\n"]
    h, r = operating_rows(data)
    if r:
        out.append(
            f"\n## Operating point on {data.oof.operating[0]['positive']} (out-of-fold)\n\n"
            + markdown_table(h, r)
            + f"\n{OPERATING_NOTE}\n"
        )
    lines = describe_test_split(data)
    if lines:
        out.append("\n## Test split\n\n" + "".join(f"{t}\n" for t in lines))
    h, r = ensemble_rows(data)
    if r:
        out.append("\n## Ensemble selection across trials\n\n" + markdown_table(h, r))
        out.append("".join(f"\n{t}\n" for t in ensemble_text(data)))
    return "".join(out)


def paper_table_markdown(data: ReportData) -> str:
    header, rows = paper_rows(data)
    return (
        f"### Paper-style table ({data.study_name})\n\n"
        + markdown_table(
            header, rows, ["left", "right", "left", "right", "right", "right", "right"]
        )
        + "\n"
        + paper_caveat(data.folds)
        + "\n"
    )


def report_markdown(data: ReportData) -> str:
    """The whole report as Markdown: header, warning, counts, leaderboard (top K), best per
    backbone / frozen depth / head, the paper-style table and the notes."""
    a = data.attrs
    profile = (
        (a.get("profile") or {}).get("name")
        if isinstance(a.get("profile"), dict)
        else a.get("profile")
    )
    out = [f"# automl-cxr report: {data.study_name}\n"]
    out.append(
        f"- dataset: {a.get('dataset', '?')} (classes: {', '.join(a.get('classes') or [])})\n"
        f"- storage: {data.storage}\n"
        f"- profile: {profile or '?'}; objectives: {', '.join(a.get('objectives') or [])}\n"
        f"- ranked by: {data.metric} (mean over {data.folds}, 95 % CI)\n"
        f"- trials: {counts_text(data.counts)}\n"
    )
    if data.warning:
        out.append(
            f"\n> **⚠ Shortcut risk (source–label alignment, Cramér's V = "
            f"{data.cramers_v}):** {data.warning}\n"
        )
    if data.counts.get("RUNNING"):
        out.append(
            f"\n> The study is still running ({data.counts['RUNNING']} trial(s)): this "
            "report is a snapshot.\n"
        )
    k = min(data.top, len(data.board))
    header, rows = leaderboard_rows(data, data.top)
    out.append(f"\n## Leaderboard (top {k} of {len(data.board)} ranked)\n\n")
    out.append(
        markdown_table(
            header,
            rows,
            [
                "right",
                "left",
                "right",
                "right",
                "right",
                "right",
                "right",
                "left",
                "left",
                "left",
                "right",
                "right",
                "right",
            ],
        )
    )
    out.append(f"\n{mark_legend(data)}\n")
    out.append(clinic_markdown(data))
    for title, frame, by in (
        ("Best per backbone", data.by_backbone, "backbone"),
        ("Best per frozen depth", data.by_frozen, "frozen_depth"),
        ("Best per head design", data.by_head, "head"),
    ):
        h, r = group_rows(data, frame, by)
        out.append(f"\n## {title}\n\n" + markdown_table(h, r))
    out.append("\n## Beside the seed paper\n\n" + paper_table_markdown(data).split("\n", 2)[2])
    if data.compare is not None:
        h, r = compare_rows(data)
        out.append(f"\n## Comparison with {data.compare_name}\n\n" + markdown_table(h, r))
    if data.notes:
        out.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in data.notes))
    return "".join(out)


def _csv_value(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        return json.dumps(json_safe(v), sort_keys=True)
    return v


def leaderboard_csv(data: ReportData) -> str:
    cols = [c for c in LEADERBOARD_COLUMNS if c in data.board]
    cols += [c for c in data.board.columns if c.startswith("ext_")]
    frame = data.board[cols].copy()
    # Ranked by one of the columns shown anyway (accuracy, covid_*): keep one copy of it.
    frame = frame.drop(
        columns=[
            c
            for c in (data.metric, f"{data.metric}_ci_low", f"{data.metric}_ci_high")
            if c in frame
        ]
    )
    frame = frame.rename(columns={"number": "trial", "value": data.metric})
    return _frame_csv(frame)


_INT_COLUMNS = (
    "params_total",
    "params_trainable",
    "frozen_stages",
    "num_stages",
    "trial",
    "a_trial",
    "b_trial",
)


def _frame_csv(frame: pd.DataFrame, drop: Sequence[str] = ()) -> str:
    frame = frame.drop(columns=[c for c in drop if c in frame]).copy()
    for c in frame.columns:
        if c in _INT_COLUMNS:
            frame[c] = pd.to_numeric(frame[c], errors="coerce").round().astype("Int64")
        elif frame[c].dtype == object:
            frame[c] = frame[c].map(_csv_value)
    return frame.to_csv(index=False)


def report_files(data: ReportData, html: str | None) -> dict[str, str]:
    """File name → content of a report folder (everything rendered in memory first)."""
    groups = (
        pd.concat(
            [
                f.assign(group_by=by).rename(columns={by: "group"})
                for f, by in (
                    (data.by_backbone, "backbone"),
                    (data.by_frozen, "frozen_depth"),
                    (data.by_head, "head"),
                )
                if not f.empty
            ],
            ignore_index=True,
        )
        if len(data.board)
        else pd.DataFrame()
    )
    files = {
        "report.md": report_markdown(data),
        "leaderboard.csv": leaderboard_csv(data),
        "leaderboard.json": json.dumps(data.summary(), indent=2) + "\n",
        "trials.csv": _frame_csv(data.records, drop=("hover", "folds", "splits")),
        "best_per_group.csv": _frame_csv(groups),
        "paper_table.csv": _frame_csv(data.paper),
        "paper_table.md": paper_table_markdown(data),
    }
    if data.compare is not None:
        files["compare.csv"] = _frame_csv(data.compare)
    if html is not None:
        files["index.html"] = html
    return files


REPORT_FILES = (
    "index.html",
    "report.md",
    "leaderboard.csv",
    "leaderboard.json",
    "trials.csv",
    "best_per_group.csv",
    "paper_table.csv",
    "paper_table.md",
    "compare.csv",
)
"""Every file a report folder can hold (a new report removes the ones it does not write)."""


def write_files(out: Path, files: Mapping[str, str]) -> list[Path]:
    """Write all `files` into `out`, or none of them.

    Each file goes to a temporary name first and is renamed into place only when every one
    was written; on any error the temporaries (and a folder made for them) are removed and a
    StorageError names the path. Report files of an earlier run that this one does not write
    (e.g. ``compare.csv``) are removed, so the folder never mixes two reports.
    """
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the report folder {out}: {exc.strerror or exc}"
        ) from None
    if not out.is_dir():
        raise StorageError(f"cannot write the report to {out}: not a folder")
    tmp: list[tuple[Path, Path]] = []
    try:
        for name, text in files.items():
            final = out / name
            part = out / f".{name}.part-{os.getpid()}"
            tmp.append((part, final))
            part.write_text(text, encoding="utf-8")
    except OSError as exc:
        for part, _ in tmp:
            part.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise StorageError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    for part, final in tmp:
        os.replace(part, final)
    for name in REPORT_FILES:
        if name not in files:
            with contextlib.suppress(OSError):
                (out / name).unlink(missing_ok=True)
    return [final for _, final in tmp]
