"""The Python API (issue 26 §2): `import automl_cxr as ac` exposes prepare / search / report /
export / load_model, thin over the CLI's code, with the same errors; examples/quickstart.py
runs end to end on the shared X-rays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

import automl_cxr as ac
from automl_cxr.errors import AutomlCxrError, ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent


def test_search_report_export_predict(prepared_dir: Path, tmp_path: Path, shared_data: Path):
    study = ac.search(
        "three_class", trials=2, data_dir=prepared_dir, storage=tmp_path / "a.db",
        profile="smoke", progress=False,
    )  # fmt: skip
    assert isinstance(study, optuna.Study) and len(study.trials) == 2
    import automl_cxr.report  # noqa: F401  (the subpackage import rebinds the name)

    rep = ac.report(study)
    board = rep.leaderboard
    assert isinstance(board, pd.DataFrame) and len(board) >= 1 and "value" in board
    assert "leaderboard" in rep.data.summary()
    assert rep.figures and all(hasattr(f, "to_plotly_json") for f in rep.figures.values())
    assert "<table" in rep._repr_html_()
    files = rep.save(tmp_path / "rep")
    assert (tmp_path / "rep" / "index.html") in files
    again = ac.search(
        "three_class", trials=3, data_dir=prepared_dir, storage=tmp_path / "a.db",
        profile="smoke", progress=False,
    )  # fmt: skip
    assert len(again.trials) == 3  # resumed, as on the command line
    model = ac.export(study, out=tmp_path / "m", data_dir=prepared_dir, progress=False)
    films = sorted((shared_data / "kermany" / "chest_xray" / "test" / "NORMAL").glob("*"))[:2]
    table = model.predict(films)
    assert list(table.columns) == ["path", *model.classes, "predicted", "thresholded"]
    assert table[model.classes].sum(axis=1).round(4).eq(1.0).all()
    assert ac.load_model(tmp_path / "m").classes == model.classes


def test_errors_are_the_clis(prepared_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        ac.search("nope", trials=1, data_dir=prepared_dir, storage=tmp_path / "x.db")
    with pytest.raises(ConfigError, match="cv must be one of"):
        ac.search("three_class", trials=1, data_dir=prepared_dir, cv="hospital")
    with pytest.raises(AutomlCxrError, match="sources folder .* does not exist"):
        ac.prepare(tmp_path / "missing", data_dir=tmp_path / "d")
    with pytest.raises(AutomlCxrError, match="lives in memory"):
        ac.report(optuna.create_study())


def test_quickstart_example_runs(shared_data: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py"), "--sources", str(shared_data),
         "--work", str(tmp_path / "qs"), "--trials", "3"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "binary_adult" in out and "Test split (site:0.2" in out
    assert "Best-by-CV trial" in out and "predicted" in out
    assert (tmp_path / "qs" / "report" / "index.html").is_file()
    assert (tmp_path / "qs" / "model" / "model.onnx").is_file()


def test_progress_bar_shows_count_rate_and_time_left() -> None:
    """Issue 26 §1: long work (decoding every image) shows a rate and the time left; one bar
    for the CLI and the Python API."""
    import io
    import time

    from rich.console import Console

    from automl_cxr._progress import progress_bar

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with progress_bar("decoding images", console=console) as update:
        for i in range(1, 6):
            time.sleep(0.02)
            update(i * 100, 1000)
    drawn = buf.getvalue()  # after the bar stops: its last frame is drawn then, whatever the
    # refresh thread managed under load (a CI run once caught only the first, "0/?", frame)
    assert "decoding images" in drawn and "/1000" in drawn
    assert "/s" in drawn  # the rate
    with progress_bar("quiet", enabled=False) as update:
        assert update is None
