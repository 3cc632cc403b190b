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
    from automl_cxr.study._storage import open_storage

    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if psycopg2-binary were missing
    with pytest.raises(MissingDependency) as exc:
        open_storage("postgresql://user@127.0.0.1:1/db")
    assert isinstance(exc.value, AutomlCxrError) and isinstance(exc.value, ImportError)
    assert "psycopg2-binary" in str(exc.value) and "automl-cxr[postgres]" in str(exc.value)
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
