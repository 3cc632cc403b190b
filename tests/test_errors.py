"""Errors stay inside the project's hierarchy (issue 13, item 11)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from automl_cxr.cli import main
from automl_cxr.errors import AutomlCxrError, MissingDependency


def test_missing_database_driver_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, prepared_dir: Path, capsys
) -> None:
    from automl_cxr._storage import open_storage

    for driver in ("psycopg", "psycopg2"):  # as if the postgres extra were not installed
        monkeypatch.setitem(sys.modules, driver, None)
    with pytest.raises(MissingDependency) as exc:
        open_storage("postgresql://user@127.0.0.1:1/db")
    assert isinstance(exc.value, AutomlCxrError) and isinstance(exc.value, ImportError)
    assert "psycopg" in str(exc.value) and "automl-cxr[postgres]" in str(exc.value)
    code = main(
        ["search", "--dataset", "three_class", "--trials", "1", "--profile", "smoke",
         "--data-dir", str(prepared_dir), "--storage", "postgresql://user@127.0.0.1:1/db"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "automl-cxr[postgres]" in err and "Traceback" not in err


def test_missing_optional_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from automl_cxr.deploy._runtime import require

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependency, match=r"automl-cxr\[export\]"):
        require("onnxruntime", "onnxruntime", "ONNX inference")


@pytest.mark.postgres
def test_a_plain_postgresql_url_opens() -> None:
    """`postgresql://…` as the README writes it (SQLAlchemy 2.1 opens it with psycopg 3, which
    the postgres extra installs), not only `postgresql+psycopg2://`."""
    import os
    import time

    import optuna

    from automl_cxr._storage import close_storage, open_storage

    url = os.environ.get("AUTOML_CXR_TEST_POSTGRES")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide AUTOML_CXR_TEST_POSTGRES (.ci/run starts the server)")
        pytest.skip("AUTOML_CXR_TEST_POSTGRES not set (.ci/run starts a PostgreSQL server)")
    plain = "postgresql://" + url.split("://", 1)[1]
    storage = open_storage(plain)
    name = f"plain-url-{os.getpid()}-{time.time_ns()}"
    study = optuna.create_study(storage=storage, study_name=name)
    study.enqueue_trial({"x": 1.0})
    study.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)
    assert optuna.load_study(study_name=name, storage=storage).best_value == 1.0
    optuna.delete_study(study_name=name, storage=storage)
    close_storage(storage)
