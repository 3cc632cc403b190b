"""`automl-cxr report` on a real smoke study (plus hand-added failed, pruned and running trials),
and the data side on handcrafted numbers."""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from automl_cxr.cli import main
from automl_cxr.engine import corrected_paired_ttest
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.report import (
    best_per_group,
    build_figures,
    build_report_data,
    history_frame,
    leaderboard,
    load_report,
    load_study,
    make_report,
    not_worse_than_best,
    paper_caveat,
    paper_table,
    pareto_flags,
    render_html,
    resolve_metric,
)
from automl_cxr.study import SearchSettings, run_search

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")


# ----------------------------------------------------------------------------- fixtures


def _build_study(db: Path, prepared_dir: Path) -> None:
    """A real smoke-profile study, plus one FAIL, one PRUNED and one RUNNING trial by hand."""
    run_search(
        SearchSettings(
            dataset="three_class",
            trials=5,
            data_dir=prepared_dir,
            storage=str(db),
            profile="smoke",
            seed=0,
        )
    )
    url = f"sqlite:///{db}"  # no heartbeat: the trials below are made by hand, not optimize()
    (name,) = optuna.get_all_study_names(url)
    study = optuna.load_study(
        study_name=name, storage=url, sampler=optuna.samplers.RandomSampler(seed=1)
    )
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True)}
    failed = study.ask(dist)
    failed.set_user_attr("fail_reason", "training loss became nan (by hand)")
    study.tell(failed, state=TrialState.FAIL)
    pruned = study.ask(dist)
    pruned.report(0.3, 0)
    study.tell(pruned, state=TrialState.PRUNED)
    running = study.ask(dist)  # never told: the study is "still running"
    running.report(0.4, 0)


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The study, built once per test run: pytest-xdist workers share it through a lock in
    the run's common temporary folder (the tests only read it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / "report-smoke-study"
    folder.mkdir(exist_ok=True)
    db = folder / "s.db"
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = folder / "done"
        if not done.exists():  # built in place under the lock; `done` marks it complete
            db.unlink(missing_ok=True)
            _build_study(db, request.getfixturevalue("prepared_dir"))
            done.touch()
    return db


@pytest.fixture(scope="module")
def study(study_db: Path) -> optuna.Study:
    return load_study(str(study_db))


@pytest.fixture(scope="module")
def data(study_db: Path):
    return load_report(str(study_db))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory, study_db: Path) -> Path:
    out = tmp_path_factory.mktemp("report-out") / "three_class"
    make_report(str(study_db), out=out)
    return out


def _clip(x):
    return None if x is None else min(1.0, max(0.0, x))


# ----------------------------------------------------------------------------- ranking


def test_leaderboard_matches_stored_values(study: optuna.Study, data) -> None:
    metric = study.user_attrs["metric"]
    assert data.metric == metric == "balanced_accuracy"
    complete = [
        t
        for t in study.get_trials()
        if t.state == TrialState.COMPLETE and t.user_attrs.get(metric) is not None
    ]
    board = data.board
    assert len(board) == len(complete) >= 2
    assert set(board["number"]) == {t.number for t in complete}
    by_number = {t.number: t for t in complete}
    # Order: the stored fold mean, descending; ties broken by the stored latency, then size.
    keys = [
        (
            -by_number[n].user_attrs[metric],
            by_number[n].user_attrs["latency_ms"],
            by_number[n].user_attrs["params_total"],
            n,
        )
        for n in board["number"]
    ]
    assert keys == sorted(keys)
    assert list(board["rank"]) == list(range(1, len(board) + 1))
    for r in board.itertuples():
        t = by_number[r.number]
        s = t.user_attrs["metrics"]["summary"]["metrics"][metric]
        assert r.value == pytest.approx(t.user_attrs[metric])
        assert r.value == pytest.approx(t.value)
        assert r.ci_low == pytest.approx(_clip(s["ci_low"]))
        assert r.ci_high == pytest.approx(_clip(s["ci_high"]))
        assert r.ci_low <= r.value <= r.ci_high
        assert r.n_folds == s["n"] == 2
        assert list(r.folds) == pytest.approx(s["folds"])
        cs = t.user_attrs["metrics"]["summary"]["metrics"]["covid_sensitivity"]
        assert r.covid_sensitivity == pytest.approx(t.user_attrs["covid_sensitivity"])
        assert r.covid_sensitivity_ci_low == pytest.approx(_clip(cs["ci_low"]))
        assert r.covid_specificity == pytest.approx(t.user_attrs["covid_specificity"])
        assert r.latency_ms == pytest.approx(t.user_attrs["latency_ms"])
        assert r.params_total == t.user_attrs["params_total"]
        assert r.backbone == t.params["backbone"]
        cfg = t.user_attrs["config"]
        assert r.frozen_depth == f"{cfg['model']['frozen_stages']}/{cfg['num_stages']}"
    # The best trial is Optuna's best trial (single objective, maximised).
    assert int(board.iloc[0]["number"]) == study.best_trial.number or (
        board.iloc[0]["value"] == pytest.approx(study.best_value)
    )


def test_failed_pruned_running_are_counted_not_ranked(study: optuna.Study, data) -> None:
    trials = study.get_trials()
    expected = {
        s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
    }
    assert expected["FAIL"] >= 1 and expected["PRUNED"] >= 1 and expected["RUNNING"] == 1
    for s, n in expected.items():
        assert data.counts[s] == n
    assert set(data.board["state"]) == {"COMPLETE"}
    unranked = {t.number for t in trials if t.state != TrialState.COMPLETE}
    assert not unranked & set(data.board["number"])
    assert any("not ranked" in n and "pruned" in n and "fail" in n for n in data.notes)
    assert any("training loss became nan (by hand)" in n for n in data.notes)
    # Every trial is in the records, pruned and running ones in the learning curves.
    assert set(data.records["number"]) == {t.number for t in trials}
    assert unranked - {t.number for t in trials if t.state == TrialState.FAIL} <= set(
        data.curves["number"]
    )
    assert (
        data.curves.dropna(subset=["fold"])["step"]
        == data.curves.dropna(subset=["fold"])["fold"] * 2
        + data.curves.dropna(subset=["fold"])["epoch"]
    ).all()


def test_not_worse_marks_follow_the_paired_test(data) -> None:
    board = data.board
    best = board.iloc[0]
    assert best["not_worse"] is True and best["p_vs_best"] == 1.0
    for r in board.iloc[1:].itertuples():
        # The corrected resampled t-test, with the folds' own training/validation sizes.
        n_train = [s["n_train"] for s in best["splits"]]
        n_val = [s["n_val"] for s in best["splits"]]
        res = corrected_paired_ttest(r.folds, best["folds"], n_train, n_val, alternative="less")
        assert r.p_vs_best == pytest.approx(res["p_value"], nan_ok=True)
        expected = None if math.isnan(res["p_value"]) else res["p_value"] >= 0.05
        assert r.not_worse is expected


def test_best_per_group_on_the_real_study(data) -> None:
    for frame, by in (
        (data.by_backbone, "backbone"),
        (data.by_frozen, "frozen_depth"),
        (data.by_head, "head"),
    ):
        assert sorted(frame[by]) == sorted(set(data.board[by].astype(str)))
        assert frame["n_trials"].sum() == len(data.board)
        for r in frame.itertuples():
            group = data.board[data.board[by].astype(str) == getattr(r, by)]
            assert r.number == group.iloc[0]["number"]
            assert r.value == group["value"].max()


def test_source_label_warning_is_carried(study: optuna.Study, data, report_dir: Path) -> None:
    warning = study.user_attrs["source_label_alignment"]["warning"]
    assert warning and data.warning == warning
    md = (report_dir / "report.md").read_text()
    assert "Shortcut risk" in md and warning in md
    page = (report_dir / "index.html").read_text()
    assert 'id="shortcut-warning"' in page


# ----------------------------------------------------------------------------- handcrafted


def test_not_worse_than_best_handcrafted() -> None:
    best = [0.90, 0.92, 0.91, 0.93, 0.90]
    folds = {
        0: best,
        1: [0.70, 0.71, 0.69, 0.72, 0.70],  # clearly worse on every fold
        2: [0.91, 0.90, 0.92, 0.92, 0.89],  # as good within noise
        3: [0.95, 0.96, 0.94, 0.97, 0.95],  # better (cannot happen for the real best)
        4: [0.89, 0.91, 0.90, 0.92, 0.89],  # worse by exactly 0.01 on every fold
        5: [0.91],  # other folds
    }
    marks = not_worse_than_best(folds, 0)
    assert marks[0] == {"p_value": 1.0, "mean_diff": 0.0, "n": 5, "not_worse": True}
    assert marks[1]["not_worse"] is False and marks[1]["p_value"] < 1e-4
    assert marks[1]["mean_diff"] == pytest.approx(0.704 - 0.912)
    assert marks[2]["not_worse"] is True and marks[2]["p_value"] > 0.05
    assert marks[3]["not_worse"] is True and marks[3]["p_value"] > 0.5
    assert marks[4]["not_worse"] is False  # a constant deficit is significant
    assert marks[5]["not_worse"] is None and math.isnan(marks[5]["p_value"])
    # Two folds: testable; one fold: not.
    two = not_worse_than_best({0: [0.9, 0.8], 1: [0.85, 0.8]}, 0)
    assert two[1]["n"] == 2 and two[1]["not_worse"] is True
    one = not_worse_than_best({0: [0.9], 1: [0.1]}, 0)
    assert one[1]["not_worse"] is None
    # NaN folds are dropped pairwise.
    nan = not_worse_than_best({0: [0.9, 0.91, float("nan")], 1: [0.5, 0.52, 0.9]}, 0)
    assert nan[1]["n"] == 2
    # Different recorded splits: not tested.
    spl = not_worse_than_best({0: best, 2: folds[2]}, 0, splits={0: [1, 2], 2: [1, 3]})
    assert spl[2]["not_worse"] is None
    with pytest.raises(ConfigError):
        not_worse_than_best(folds, 99)
    with pytest.raises(ConfigError):
        not_worse_than_best(folds, 0, alpha=1.5)


def _records(rows: list[dict]) -> pd.DataFrame:
    base = {
        "state": "COMPLETE",
        "ci_low": math.nan,
        "ci_high": math.nan,
        "latency_ms": 1.0,
        "params_total": 1000.0,
        "splits": None,
        "backbone": "a",
        "head": "linear",
        "frozen_depth": "1/4",
        "hover": "",
    }
    return pd.DataFrame([{**base, **r} for r in rows])


def test_leaderboard_ties_broken_by_cost() -> None:
    recs = _records(
        [
            {"number": 0, "value": 0.8, "folds": [0.8, 0.8], "latency_ms": 5.0},
            {"number": 1, "value": 0.9, "folds": [0.9, 0.9], "latency_ms": 9.0},
            {"number": 2, "value": 0.8, "folds": [0.8, 0.8], "latency_ms": 2.0},
            {
                "number": 3,
                "value": 0.8,
                "folds": [0.8, 0.8],
                "latency_ms": 2.0,
                "params_total": 10.0,
            },
            {"number": 4, "value": math.nan, "folds": [math.nan] * 2},
            {"number": 5, "value": 0.99, "folds": [0.99] * 2, "state": "PRUNED"},
            {"number": 6, "value": 0.8, "folds": [0.8, 0.8], "latency_ms": math.nan},
        ]
    )
    board = leaderboard(recs)
    assert list(board["number"]) == [1, 3, 2, 0, 6]
    assert list(board["rank"]) == [1, 2, 3, 4, 5]
    # Constant folds 0.1 below the best: significantly worse (t = -inf, p = 0).
    assert board.loc[1:, "not_worse"].tolist() == [False] * 4


def test_groupings_history_pareto_paper_handcrafted() -> None:
    recs = _records(
        [
            {"number": 0, "value": 0.70, "folds": [0.7, 0.7], "backbone": "b", "head": "mlp"},
            {"number": 1, "value": 0.90, "folds": [0.9, 0.9], "backbone": "a"},
            {"number": 2, "state": "FAIL", "value": math.nan, "folds": []},
            {"number": 3, "value": 0.80, "folds": [0.8, 0.8], "backbone": "b"},
            {
                "number": 4,
                "value": 0.95,
                "folds": [0.95, 0.95],
                "backbone": "a",
                "accuracy": 0.9,
                "accuracy_ci_low": 0.85,
                "accuracy_ci_high": 0.95,
            },
        ]
    )
    board = leaderboard(recs)
    g = best_per_group(board, "backbone")
    assert g[["backbone", "n_trials", "number"]].values.tolist() == [["a", 2, 4], ["b", 2, 3]]
    h = history_frame(recs)
    assert h["number"].tolist() == [0, 1, 2, 3, 4]
    assert h["best_so_far"].tolist() == [0.70, 0.90, 0.90, 0.90, 0.95]
    assert pareto_flags([0.9, 0.8, 0.95, 0.7, math.nan], [1, 1, 3, 0.5, 0.1]) == [
        True,
        False,
        True,
        True,
        False,
    ]
    pt = paper_table(
        board,
        {
            "accuracy": 0.9678,
            "covid_sensitivity": 0.9866,
            "covid_specificity": 0.9646,
            "reference": "A & M 2020",
        },
    )
    assert pt["row"].tolist() == ["best overall", "best a", "best b", "A & M 2020 (reported)"]
    assert pt.iloc[0]["trial"] == 4 and pt.iloc[0]["accuracy_ci_low"] == 0.85
    # The paper's 96.78 % is a COVID-vs-rest accuracy: an old study's "accuracy" moves over.
    assert pt.iloc[-1]["covid_accuracy"] == 0.9678 and pt.iloc[-1]["source"] == "paper"
    assert math.isnan(pt.iloc[-1]["accuracy"])
    pt = paper_table(board, {"covid_accuracy": 0.9678, "accuracy": 0.9472})
    assert (pt.iloc[-1]["covid_accuracy"], pt.iloc[-1]["accuracy"]) == (0.9678, 0.9472)


def test_resolve_metric() -> None:
    assert resolve_metric({"metric": "accuracy"}, None) == "accuracy"
    assert resolve_metric({"metric": "latency", "objectives": ["latency", "auc"]}, None) == "auc"
    assert resolve_metric({}, None) == "balanced_accuracy"
    with pytest.raises(ConfigError, match="allowed"):
        resolve_metric({}, "nope", ["accuracy", "auc"])
    with pytest.raises(ConfigError, match="cost"):
        resolve_metric({}, "latency")


def test_partial_records_and_multi_objective_in_memory() -> None:
    """Old or partial records (scalar user attributes only, no fold detail) on a two-objective
    study: ranked by the first quality objective, no intervals, marks not testable, and every
    table and figure still builds."""
    from automl_cxr.report import report_files

    study = optuna.create_study(directions=["minimize", "maximize"])
    study.set_user_attr("objectives", ["latency", "accuracy"])
    study.set_user_attr("metric", "latency")
    dists = {
        "backbone": optuna.distributions.CategoricalDistribution(["a", "b"]),
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
    }
    for i, (bb, acc, lat) in enumerate(
        [("a", 0.8, 3.0), ("b", 0.9, 9.0), ("a", 0.9, 4.0), ("b", None, 1.0)]
    ):
        study.add_trial(
            optuna.trial.create_trial(
                params={"backbone": bb, "lr": 10 ** -(i + 1)},
                distributions=dists,
                values=[lat, acc if acc is not None else 0.0],
                user_attrs={"accuracy": acc, "latency_ms": lat, "params_total": 1000 * (i + 1)},
            )
        )
    data = build_report_data(study)
    assert data.metric == "accuracy"
    assert list(data.board["number"]) == [2, 1, 0]  # 0.9 (4 ms) before 0.9 (9 ms)
    assert data.board["ci_low"].isna().all()
    assert data.board["not_worse"].iloc[1:].isna().all()
    assert any("no accuracy score" in n for n in data.notes)
    figs = build_figures(data)
    assert "confusion" not in figs and "roc" not in figs and "pareto" in figs
    files = report_files(data, render_html(data, figs))
    assert "| 1 | ≈ best | 2 | 0.9000 |" in files["report.md"]


# ----------------------------------------------------------------------------- figures


def test_figures_are_drawn_from_the_data(data) -> None:
    figs = build_figures(data)
    assert list(figs) == [
        "backbones",
        "frozen",
        "heads",
        "lr",
        "parallel",
        "importance",
        "history",
        "pareto",
        "confusion",
        "roc",
        "reliability",
        "curves",
    ]
    # Backbone boxes hold exactly the ranked scores, with each trial's parameters on hover.
    ys = sorted(v for tr in figs["backbones"].data for v in tr.y)
    assert ys == pytest.approx(sorted(data.board["value"]))
    hover = " ".join(h for tr in figs["backbones"].data for h in tr.hovertext)
    assert "lr = " in hover and "head = " in hover and "backbone = " in hover
    assert figs["lr"].layout.xaxis.type == "log"
    history = figs["history"].data[-1]
    assert list(history.y) == pytest.approx(list(data.history["best_so_far"]), nan_ok=True)
    assert len(figs["confusion"].data) == len(data.confusions) == min(4, len(data.board))
    assert np.asarray(data.confusions[0]["matrix"]).sum() > 0
    assert data.confusions[0]["number"] == data.board.iloc[0]["number"]
    labels = {tr.name for tr in figs["roc"].data if tr.name}
    assert labels == set(data.attrs["classes"]) | {"operating point (youden)"}
    marks = [tr for tr in figs["roc"].data if tr.name == "operating point (youden)"]
    op = data.oof.operating[0]
    assert marks[0].x[0] == pytest.approx(1 - op["specificity"])
    assert marks[0].y[0] == pytest.approx(op["sensitivity"])
    rel = figs["reliability"].data[1]
    assert list(rel.x) == pytest.approx(data.oof.reliability[0]["confidence"])


def test_importances(data, study: optuna.Study) -> None:
    done = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
    assert len(done) >= 2, "the report study needs two complete trials for this test"
    # The same numbers as Optuna's own fANOVA evaluator (seeded) on the complete trials.
    ref = optuna.create_study(direction="maximize")
    ref.add_trials(
        optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.value)
        for t in done
    )
    expected = optuna.importance.get_param_importances(
        ref, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    got = dict(zip(data.importances["param"], data.importances["importance"], strict=True))
    assert got == pytest.approx(dict(expected))
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-6)
    # fANOVA covers the parameters every complete trial has (conditional ones drop out).
    shared = set.intersection(*(set(t.params) for t in done))
    assert got and set(got) == shared
    assert data.importance_note == f"from only {len(done)} complete trials: a rough indication"


# ----------------------------------------------------------------------------- exports


def test_exports_exist_and_parse(data, report_dir: Path) -> None:
    names = {p.name for p in report_dir.iterdir()}
    assert names == {
        "index.html",
        "report.md",
        "leaderboard.csv",
        "leaderboard.json",
        "trials.csv",
        "best_per_group.csv",
        "paper_table.csv",
        "paper_table.md",
    }
    csv = pd.read_csv(report_dir / "leaderboard.csv")
    assert csv["trial"].tolist() == data.board["number"].tolist()
    assert csv["balanced_accuracy"].tolist() == pytest.approx(data.board["value"].tolist())
    assert {
        "ci_low",
        "ci_high",
        "covid_sensitivity",
        "covid_specificity",
        "latency_ms",
        "params_total",
        "not_worse",
        "params",
    } <= set(csv.columns)
    json.loads(csv["params"].iloc[0])
    js = json.loads((report_dir / "leaderboard.json").read_text())
    assert [r["number"] for r in js["leaderboard"]] == csv["trial"].tolist()
    assert js["counts"]["FAIL"] >= 1 and js["source_label_warning"]
    trials = pd.read_csv(report_dir / "trials.csv")
    assert len(trials) == len(data.records)
    assert set(trials["state"]) >= {"COMPLETE", "FAIL", "PRUNED", "RUNNING"}
    groups = pd.read_csv(report_dir / "best_per_group.csv")
    assert set(groups["group_by"]) == {"backbone", "frozen_depth", "head"}
    pt = pd.read_csv(report_dir / "paper_table.csv")
    assert pt["covid_accuracy"].iloc[-1] == pytest.approx(0.9678)
    md = (report_dir / "paper_table.md").read_text()
    assert "96.78%" in md and "98.66%" in md and "96.46%" in md
    assert paper_caveat("patient-grouped folds") in md  # the study's folds, named
    assert "image level" in md and "without patient grouping" in md
    assert "source confounding" in md
    report = (report_dir / "report.md").read_text()
    assert "## Leaderboard" in report and "≈ best" in report
    best = data.board.iloc[0]
    assert f"| 1 | ≈ best | {best['number']} | {best['value']:.4f}" in report
    for state in ("complete", "pruned", "fail", "running"):
        assert re.search(rf"\d+ {state}", report)


def test_page_text_comes_before_plotly_and_figures_draw_after_first_paint(
    report_dir: Path,
) -> None:
    """Issue 26 §1: plotly.js (4.6 MB) sat in <head> and every figure was drawn before the
    first paint (first paint ~5 s on 2 cores, benchmarks/report_scale.py); the content now
    comes first and the figures are drawn one per frame after it has painted."""
    page = (report_dir / "index.html").read_text()
    head = page[: page.index("</head>")]
    assert len(head) < 50_000, "plotly.js (or anything large) is back in <head>"
    plotly_at = page.index("Plotly.newPlot")
    assert page.index("</main>") < page.index("figure-data") < page.rindex("<script>")
    assert plotly_at > page.index("</main>")
    assert "requestAnimationFrame(function () { setTimeout(function () { draw(0)" in page


def test_html_is_self_contained(data, report_dir: Path) -> None:
    page = (report_dir / "index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I), "no external scripts"
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?https?:", page, re.I)
    assert "https://cdn.plot.ly/plotly" not in page
    assert len(page) > 3_000_000 and "Plotly.newPlot" in page  # plotly.js itself inlined
    figs = json.loads(
        re.search(
            r'<script type="application/json" id="figure-data">(.*?)</script>', page, re.S
        ).group(1)
    )
    assert list(figs) == list(build_figures(data))
    for key in figs:
        assert f'id="plot-{key}"' in page
    # Every ranked trial appears in the page's leaderboard, with its parameters as a tooltip.
    for text in data.board["params_text"]:
        assert text.replace('"', "&quot;").replace("'", "&#x27;") in page


def test_render_html_escapes_names(data) -> None:
    import copy

    d = copy.copy(data)
    d.study_name = "<script>alert(1)</script>"
    page = render_html(d, {})
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_ranking_names_what_its_mean_is_over(data, study: optuna.Study) -> None:
    """Leaderboard headings and dashboard notes say which folds the mean is over: the
    study's recorded cv mode (patient-grouped here; site-held-out for a --cv site study)."""
    import copy

    from automl_cxr.report import paper_table_markdown, report_markdown
    from automl_cxr.report._dashboard import trial_note

    assert data.attrs["protocol"]["cv"] == "patient" and data.folds == "patient-grouped folds"
    assert "(mean over patient-grouped folds, 95 % CI)" in report_markdown(data)
    site = copy.copy(data)
    site.attrs = {**data.attrs, "protocol": {**data.attrs["protocol"], "cv": "site"}}
    assert site.folds == "site-held-out folds"
    assert "(mean over site-held-out folds, 95 % CI)" in report_markdown(site)
    assert "mean over site-held-out folds" in render_html(site, {})
    # the paper-style table's caveat too (it said "patient-grouped" for every study)
    assert "ours are means over site-held-out folds" in paper_table_markdown(site)
    assert "patient-grouped" not in paper_table_markdown(site)
    assert "ours are means over site-held-out folds" in render_html(site, {})
    site.attrs = {}  # a study that recorded no protocol claims neither
    assert site.folds == "folds"
    assert not any("site-held-out folds" in n for n in data.notes)
    trial = copy.deepcopy(study.best_trial)
    assert "### Cross-validation (patient-grouped folds)" in trial_note(trial)
    for sp in trial.user_attrs["metrics"]["splits"]:
        sp["cv"] = "site"
    assert "### Cross-validation (site-held-out folds)" in trial_note(trial)


def test_site_folds_note_gives_each_folds_classes_and_flags_a_one_class_fold() -> None:
    from automl_cxr.report._data import site_folds_note

    classes = ["covid", "non_covid"]
    folds = [
        {"classes": classes, "confusion_matrix": [[80, 22], [16, 17]]},
        {"classes": classes, "confusion_matrix": [[0, 0], [40, 412]]},  # NIH alone
    ]
    note = site_folds_note(folds)
    assert "fold 0: covid 102, non_covid 33;" in note
    assert "fold 1: non_covid 452 (one class only)" in note
    assert "scores that class's recall" in note
    assert "per class" not in site_folds_note([{"n": 3}])  # no matrices: the rule alone


# ----------------------------------------------------------------------------- CLI


def test_cli_report_writes_default_folder(
    study_db: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(study_db), "--top", "3"]) == 0
    cap = capsys.readouterr()
    assert "ranked by balanced_accuracy" in cap.out
    assert "1 running" in cap.out and "still running" in cap.out
    assert "shortcut risk" in cap.err.lower()
    assert "Beside the seed paper" in cap.out  # ours next to the paper's headline numbers
    assert "96.78%" in cap.out and "98.66%" in cap.out and "96.46%" in cap.out
    assert "patient-grouped" in cap.out
    assert (tmp_path / "dashboards" / "three_class-smoke" / "index.html").is_file()


def test_cli_json(study_db: Path, data, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(study_db), "--json", "--metric", "accuracy"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "accuracy"
    values = [r["value"] for r in out["leaderboard"]]
    assert values == sorted(values, reverse=True)
    assert {r["number"] for r in out["leaderboard"]} == set(data.board["number"])
    assert not (tmp_path / "dashboards").exists(), "--json alone writes nothing"
    assert main(["report", str(study_db), "--json", "--out", "r", "--no-html"]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == "balanced_accuracy"
    assert (tmp_path / "r" / "leaderboard.csv").is_file()
    assert not (tmp_path / "r" / "index.html").exists()


def test_cli_compare(study_db: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.db"
    shutil.copy(study_db, other)
    out = tmp_path / "cmp"
    assert main(["report", str(study_db), "--compare", str(other), "--out", str(out)]) == 0
    capsys.readouterr()
    cmp = pd.read_csv(out / "compare.csv")
    assert len(cmp) >= 1 and (cmp["difference"].abs() < 1e-12).all()
    page = (out / "index.html").read_text()
    assert 'id="plot-compare"' in page and 'id="compare-table"' in page
    assert "## Comparison with" in (out / "report.md").read_text()


def test_cli_errors(study_db: Path, tmp_path: Path, capsys) -> None:
    def err(args: list[str]) -> str:
        assert main(args) == 2
        return capsys.readouterr().err

    # An empty study: a clear message and exit code 2.
    empty = tmp_path / "empty.db"
    optuna.create_study(storage=f"sqlite:///{empty}", study_name="empty-study")
    msg = err(["report", str(empty)])
    assert "empty-study" in msg and "no complete trial" in msg
    # A study whose trials all failed: counted in the message.
    failed = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'failed.db'}", study_name="all-failed"
    )
    failed.tell(failed.ask(), state=TrialState.FAIL)
    assert "1 fail" in err(["report", str(tmp_path / "failed.db")])
    # Several studies and no --study-name: the error lists them.
    many = f"sqlite:///{tmp_path / 'many.db'}"
    for name in ("three_class-smoke", "four_class-smoke"):
        optuna.create_study(storage=many, study_name=name)
    msg = err(["report", many])
    assert "--study-name" in msg and "three_class-smoke" in msg and "four_class-smoke" in msg
    msg = err(["report", many, "--study-name", "nope"])
    assert "nope" in msg and "four_class-smoke" in msg
    # Storage that does not exist; a metric the study does not have; a bad --top.
    assert "not found" in err(["report", str(tmp_path / "missing.db")])
    assert "allowed" in err(["report", str(study_db), "--metric", "f2_score"])
    assert "--top" in err(["report", str(study_db), "--top", "0"])
    # An unwritable --out (below a regular file): exit 2, the path named, nothing written.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "report"
    msg = err(["report", str(study_db), "--out", str(target)])
    assert str(target) in msg.replace("\n", "")
    assert blocker.read_text() == "x"


def test_write_is_all_or_nothing(tmp_path: Path, monkeypatch) -> None:
    from automl_cxr.report import _files

    out = tmp_path / "r"
    calls = {"n": 0}
    real = Path.write_text

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", flaky)
    with pytest.raises(StorageError, match=str(out)):
        _files.write_files(out, {"a.txt": "1", "b.txt": "2", "c.txt": "3"})
    assert not out.exists(), "the folder made for the report is removed again"
    out.mkdir()
    (out / "compare.csv").write_text("stale")
    (out / "mine.txt").write_text("kept")
    calls["n"] = 0
    with pytest.raises(StorageError):
        _files.write_files(out, {"a.txt": "1", "b.txt": "2", "c.txt": "3"})
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "mine.txt"]
    monkeypatch.undo()
    written = _files.write_files(out, {"report.md": "new"})
    assert [p.name for p in written] == ["report.md"]
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "report.md"]


def test_build_report_data_rejects_empty_in_memory() -> None:
    s = optuna.create_study()
    with pytest.raises(StorageError, match="no complete trial"):
        build_report_data(s)
    data = build_report_data(s, require_complete=False)
    assert data.board.empty and data.counts["COMPLETE"] == 0


# ----------------------------------------------------------------------------- browser


def _chromium(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHROMIUM), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")},
    )


_PROBE = (
    "<script>(function(){var e=console.error.bind(console);"
    "console.error=function(){e.apply(null,['[console.error]'].concat("
    "[].slice.call(arguments)))};window.addEventListener('error',function(ev){"
    "e('[window.error] '+ev.message)});window.addEventListener('unhandledrejection',"
    "function(ev){e('[unhandledrejection] '+ev.reason)});})();</script>"
)


@pytest.mark.browser
def test_page_renders_in_headless_chromium(data, report_dir: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (CI installs it: apt-get install -y chromium)")
    page = (report_dir / "index.html").read_text()
    # A copy with a probe that makes console.error and uncaught errors recognisable in the log.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + _PROBE, 1))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-three_class-smoke.png"
    shot.unlink(missing_ok=True)
    proc = _chromium(
        [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-unsafe-swiftshader",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-default-apps",
            "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--window-size=1400,4000",
            f"--screenshot={shot}",
            "--dump-dom",
            probe.as_uri(),
        ]
    )
    log = proc.stderr
    (ARTIFACTS / "report-chromium.log").write_text(log)
    assert proc.returncode == 0, log[-3000:]
    console = [ln for ln in log.splitlines() if "CONSOLE" in ln]
    bad = [
        ln
        for ln in console
        if any(
            k in ln
            for k in ("Uncaught", "[console.error]", "[window.error]", "[unhandledrejection]")
        )
    ]
    bad += [ln for ln in log.splitlines() if "ERROR:CONSOLE" in ln]
    assert not bad, "\n".join(bad)
    dom = proc.stdout
    (ARTIFACTS / "report-dom.html").write_text(dom)
    figs = list(build_figures(data))
    # Each figure section holds a rendered Plotly graph (its SVG layers).
    chunks = re.split(r'<section id="fig-', dom)[1:]
    assert len(chunks) == len(figs)
    for key, chunk in zip(figs, chunks, strict=True):
        assert chunk.startswith(f'{key}"'), chunk[:80]
        assert 'class="main-svg"' in chunk, f"figure {key} did not render"
    assert dom.count('class="main-svg"') >= len(figs)
    assert ">This figure could not be drawn" not in dom
    assert shot.is_file() and shot.stat().st_size > 50_000
    png = io.BytesIO(shot.read_bytes())
    assert png.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- out-of-fold


def test_calibration_operating_points_and_ensemble_in_the_report(data, report_dir: Path) -> None:
    from automl_cxr.oof import calibration_summary, load_study_oof

    oofs = load_study_oof(load_study(data.storage), data.storage)
    assert set(oofs) == set(data.board["number"])
    for r in data.board.itertuples():
        v = oofs[int(r.number)].valid()
        c = calibration_summary(v.probs, v.labels, groups=v.groups)
        assert r.ece == pytest.approx(c["ece"]) and r.ece_ci_low <= r.ece <= r.ece_ci_high
    assert data.oof.reliability and data.oof.operating
    assert [op["number"] for op in data.oof.operating] == list(data.board["number"].head(4))
    ens = data.oof.ensemble
    assert ens["score"] >= ens["best_single_score"]
    assert ens["nested"]["available"]
    summary = json.loads((report_dir / "leaderboard.json").read_text())
    assert {"ece", "ece_ci_low", "ece_ci_high"} <= set(summary["leaderboard"][0])
    assert summary["ensemble"]["weights"] and summary["operating_points"]
    md = (report_dir / "report.md").read_text()
    assert "## Ensemble selection across trials" in md and "optimistic" in md
    assert "Nested estimate" in md and "## Operating point on covid" in md
    page = (report_dir / "index.html").read_text()
    assert 'id="plot-reliability"' in page and 'id="ensemble"' in page
    assert "operating point (youden)" in page


def test_console_report_fits_80_columns(study_db: Path, data, tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "automl_cxr", "report", str(study_db), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    lines = run.stdout.splitlines()
    too_long = [ln for ln in lines if len(ln) > 80]
    assert not too_long, too_long
    assert "…" not in run.stdout  # nothing truncated
    text = run.stdout
    best = data.board.iloc[0]
    assert f"{best['value']:.4f}" in text
    assert f"[{best['ci_low']:.3f}–{best['ci_high']:.3f}]" in text
    assert str(best["backbone"]) in text.replace("\n", "")  # may wrap, never cut
    for _, r in data.paper.iterrows():  # every number of the paper table, in full
        for k in ("accuracy", "covid_accuracy", "covid_sensitivity", "covid_specificity"):
            if r[k] == r[k]:
                assert f"{100 * r[k]:.2f}%" in text
            if r[f"{k}_ci_low"] == r[f"{k}_ci_low"]:
                assert f"[{100 * r[f'{k}_ci_low']:.1f}–{100 * r[f'{k}_ci_high']:.1f}]" in text
    # --json is unchanged by the console layout
    js = subprocess.run(
        [sys.executable, "-m", "automl_cxr", "report", str(study_db), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert (
        json.loads(js.stdout)["leaderboard"]
        == json.loads(json.dumps(data.summary()))["leaderboard"]
    )


_MEASURE = (
    "<script>window.addEventListener('load',function(){setTimeout(function(){"
    "var t=document.querySelector('#leaderboard table');"
    "var rows=[].slice.call(t.querySelectorAll('tbody tr')).map(function(r){"
    "return r.getBoundingClientRect().height});"
    "var o=document.createElement('pre');o.id='measure';o.textContent=JSON.stringify({"
    "viewport:document.documentElement.clientWidth,"
    "page:document.documentElement.scrollWidth,"
    "table:Math.ceil(t.getBoundingClientRect().right),maxRow:Math.max.apply(null,rows)});"
    "document.body.appendChild(o)},300)});</script>"
)


@pytest.mark.browser
def test_leaderboard_fits_1280_px_without_horizontal_scrolling(report_dir: Path, tmp_path: Path):
    """Issue 26 §3: at 1400 px the leaderboard ran past the right edge and squeezed the
    configuration into a one-word column (rows several hundred px tall). The configuration is
    now a second row and intervals a second line: the page fits 1280 px, rows stay short."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (CI installs it: apt-get install -y chromium)")
    page = (report_dir / "index.html").read_text()
    probe = tmp_path / "measure.html"
    probe.write_text(page.replace("</body>", _MEASURE + "</body>", 1))
    proc = _chromium(
        [
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000", "--window-size=1280,900", "--dump-dom",
            probe.as_uri(),
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="measure">([^<]*)</pre>', proc.stdout)
    assert found, proc.stdout[-2000:]
    m = json.loads(found.group(1))
    assert m["page"] <= m["viewport"], m  # no horizontal scrolling
    assert m["table"] <= m["viewport"], m
    assert m["maxRow"] <= 80, m  # no row squeezed into a tall, narrow column
