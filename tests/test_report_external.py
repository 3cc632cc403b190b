"""External sets in the report: columns beside the CV figures, the generalisation-gap data
and figure, rendered in headless Chromium (issue 12 §4)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from test_protocol import _external_folder
from test_report import _PROBE, CHROMIUM, _chromium

from automl_cxr.report import build_report_data
from automl_cxr.report._figures import build_figures
from automl_cxr.report._files import leaderboard_csv
from automl_cxr.report._html import render_html
from automl_cxr.report._tables import leaderboard_rows
from automl_cxr.study import SearchSettings, load_study, run_search


@pytest.fixture(scope="module")
def ext_db(tmp_path_factory, shared_data: Path, prepared_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("ext-report")
    ext = _external_folder(shared_data, prepared_dir, root / "adults")
    db = root / "s.db"
    run_search(
        SearchSettings(
            dataset="three_class", trials=3, data_dir=prepared_dir, storage=str(db),
            profile="smoke", externals=[str(ext)], external_label_map={"NORMAL": "normal"},
        )
    )  # fmt: skip
    return db


@pytest.fixture(scope="module")
def ext_study(ext_db: Path) -> optuna.Study:
    return load_study(str(ext_db))


def test_external_columns_and_gap_match_the_trials(ext_study: optuna.Study) -> None:
    data = build_report_data(ext_study)
    assert data.externals == ["adults"]
    done = {t.number: t for t in ext_study.trials if t.state.name == "COMPLETE"}
    assert set(data.board["number"]) == set(done)
    for r in data.board.to_dict(orient="records"):
        rec = done[r["number"]].user_attrs["externals"]["adults"]
        ci = rec["bootstrap"]["metrics"]["balanced_accuracy"]
        assert r["ext_adults"] == pytest.approx(rec["metrics"]["balanced_accuracy"])
        assert (r["ext_adults_ci_low"], r["ext_adults_ci_high"]) == pytest.approx(
            (ci["ci_low"], ci["ci_high"])
        )
    gap = data.gap.set_index("number")
    assert set(gap.index) == set(done)
    for n, t in done.items():
        assert gap.loc[n, "cv"] == pytest.approx(t.value)
        assert gap.loc[n, "gap"] == pytest.approx(t.value - gap.loc[n, "ext"])
    # The ranking is the CV's alone: external figures never reorder it.
    assert list(data.board["value"]) == sorted(data.board["value"], reverse=True)
    header, rows = leaderboard_rows(data)
    assert header[-1] == "external adults [95% CI]"
    assert all(re.match(r"^\d\.\d{3} \[", row[-1]) for row in rows)
    assert "ext_adults_ci_high" in leaderboard_csv(data).splitlines()[0]
    assert "gap" in build_figures(data)


def test_gap_figure_draws_the_diagonal_and_each_set(ext_study: optuna.Study) -> None:
    data = build_report_data(ext_study)
    fig = build_figures(data)["gap"]
    diag, points = fig.data[0], fig.data[1]
    assert list(diag.x) == list(diag.y)  # the no-gap line
    assert points.name == "external: adults"
    np.testing.assert_allclose(points.x, data.gap["cv"])
    np.testing.assert_allclose(points.y, data.gap["ext"])


@pytest.mark.browser
def test_gap_figure_renders_in_headless_chromium(ext_study: optuna.Study, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (CI installs it: apt-get install -y chromium)")
    data = build_report_data(ext_study)
    page = render_html(data, build_figures(data))
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + _PROBE, 1))
    proc = _chromium(
        ["--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
         "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--virtual-time-budget=10000", "--dump-dom",
         probe.as_uri()]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[console.error]" not in proc.stderr and "Uncaught" not in proc.stderr
    chunk = proc.stdout.split('<section id="fig-gap"', 1)[1].split("</section>", 1)[0]
    assert 'class="main-svg"' in chunk, "the gap figure did not render"
    assert "Generalisation gap" in chunk and "external: adults" in chunk


def test_console_report_shows_the_external_sets_in_80_columns(
    ext_db: Path, ext_study: optuna.Study, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    from automl_cxr.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["report", str(ext_db), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "generalisation:" in out and "adults" in out
    assert all(len(line) <= 80 for line in out.splitlines()), max(out.splitlines(), key=len)
    best = build_report_data(ext_study).board.iloc[0]
    assert (
        f"{best['ext_adults']:.3f}" in out and f"{best['value'] - best['ext_adults']:+.3f}" in out
    )
