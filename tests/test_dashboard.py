"""`automl-cxr dashboard`: optuna-dashboard on a real smoke study, read back over its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from automl_cxr.cli import main
from automl_cxr.study import SearchSettings, run_search

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    db = tmp_path_factory.mktemp("dashboard") / "s.db"
    run_search(
        SearchSettings(
            dataset="three_class",
            trials=1,
            data_dir=prepared_dir,
            storage=str(db),
            profile="smoke",
            seed=0,
            pruner="none",
        )
    )
    return db


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (localhost only)
        return r.status, r.read()


def test_dashboard_serves_the_study(study_db: Path, tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    code = (
        "import sys, automl_cxr.cli._report\n"
        "from automl_cxr.cli import main\n"
        f"sys.exit(main(['dashboard', {str(study_db)!r}, '--port', '{port}', "
        "'--host', '127.0.0.1']))\n"
    )
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        deadline = time.monotonic() + 120
        studies = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                status, body = _get(f"{base}/api/studies", timeout=2)
                if status == 200:
                    studies = json.loads(body)["study_summaries"]
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        log.flush()
        assert studies is not None, (
            f"dashboard did not come up (exit {proc.poll()}):\n"
            + (tmp_path / "dashboard.log").read_text()[-3000:]
        )
        stored = optuna.load_study(study_name="three_class-smoke", storage=f"sqlite:///{study_db}")
        assert [s["study_name"] for s in studies] == ["three_class-smoke"]
        sid = studies[0]["study_id"]
        status, body = _get(f"{base}/api/studies/{sid}")
        assert status == 200
        detail = json.loads(body)
        attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
        assert json.loads(attrs["paper"])["covid_accuracy"] == pytest.approx(0.9678)
        complete = [t for t in stored.trials if t.state.name == "COMPLETE"]
        assert complete
        served = {t["number"]: t for t in detail["trials"]}
        assert set(served) == {t.number for t in stored.trials}
        for t in complete:
            got = {a["key"]: a["value"] for a in served[t.number]["user_attrs"]}
            for key in (
                "balanced_accuracy",
                "accuracy",
                "covid_sensitivity",
                "latency_ms",
                "params_total",
            ):
                assert float(got[key]) == pytest.approx(t.user_attrs[key]), key
            assert got["config"].startswith('{"model"')
            assert served[t.number]["state"].lower() == "complete"
            assert served[t.number]["values"] == pytest.approx(t.values)
            params = {p["name"]: p for p in served[t.number]["params"]}
            assert set(params) == set(t.params)
            # the trial's note: per-fold table with mean and CI, per class, calibration, config
            note = served[t.number]["note"]["body"]
            assert f"## Trial {t.number}" in note and "| **mean** |" in note
            assert "95% CI" in note and "### Per class" in note and "ECE " in note
            assert "### Configuration" in note and "### Weights" in note
            fold0 = t.user_attrs["metrics"]["folds"][0]["balanced_accuracy"]
            assert f"{fold0:.4f}" in note
            # its artifacts: images served by the dashboard from the study's artifact store
            arts = {a["filename"]: a for a in served[t.number]["artifacts"]}
            want = {"confusion_matrix.png", "roc.png", "reliability.png", "learning_curves.png"}
            assert want <= set(arts), sorted(arts)
            for name in want:
                url = f"{base}/artifacts/{sid}/{served[t.number]['trial_id']}/"
                status, png = _get(url + arts[name]["artifact_id"])
                assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n", name
        # the study page: the report's key figures and a leaderboard note
        figs = {g["id"] for g in detail["plotly_graph_objects"]}
        assert {"automl-cxr-history", "automl-cxr-roc", "automl-cxr-reliability"} <= figs
        assert "Ranked by balanced_accuracy" in detail["note"]["body"]
        status, page = _get(f"{base}/dashboard")
        assert status == 200 and b"<html" in page.lower()
        if CHROMIUM.exists():  # a screenshot of the trial page for the docs
            shot = tmp_path / "trial.png"
            first = complete[0].number
            url = f"{base}/dashboard/studies/{sid}/trials?numbers={first}"
            subprocess.run(
                [
                    str(CHROMIUM),
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--window-size=1400,1800",
                    "--virtual-time-budget=15000",
                    f"--screenshot={shot}",
                    url,
                ],
                capture_output=True,
                timeout=120,
                check=False,
            )
            assert shot.is_file() and shot.stat().st_size > 10_000
            if os.environ.get("AUTOML_CXR_SCREENSHOT"):
                shutil.copy(shot, os.environ["AUTOML_CXR_SCREENSHOT"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_dashboard_errors(tmp_path: Path, capsys) -> None:
    assert main(["dashboard", str(tmp_path / "missing.db")]) == 2
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty.db"
    optuna.storages.RDBStorage(f"sqlite:///{empty}")  # a storage without any study
    assert main(["dashboard", str(empty)]) == 2
    assert "no study" in capsys.readouterr().err
    assert main(["dashboard", str(empty), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
