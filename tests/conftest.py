"""Shared fixtures: the real shared X-rays, and datasets prepared from them once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never wait on the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("AUTOML_CXR_SHARED", REPO.parent / "shared" / "data"))


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch

        # xdist runs one worker per core: one thread each avoids oversubscription.
        torch.set_num_threads(int(os.environ.get("AUTOML_CXR_TEST_THREADS", "1")))
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session", autouse=True)
def _no_default_data_dir(tmp_path_factory: pytest.TempPathFactory):
    """Commands run without --data-dir read an empty folder, not the checkout's ./data (a
    developer's prepared datasets would otherwise change what the tests see)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOML_CXR_DATA", str(tmp_path_factory.mktemp("default-data")))
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "cohen").is_dir():
        pytest.fail(f"shared X-ray data not found at {SHARED} (set AUTOML_CXR_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """Every recipe prepared from the shared data (once per test process): the paper's three
    (unchanged by NIH's presence), binary_adult and four_class_mixed."""
    from automl_cxr.data import prepare_recipes

    out = tmp_path_factory.mktemp("prepared")
    prepare_recipes(
        cohen=shared_data / "cohen",
        kermany=shared_data / "kermany",
        nih=shared_data / "nih",
        data_dir=out,
    )
    return out


@pytest.fixture(scope="module")
def adult_small(prepared_dir: Path):
    """30 binary_adult images (both classes, Cohen and NIH): for tests of the training levers."""
    from automl_cxr.data import load_dataset
    from automl_cxr.study import subsample

    return subsample(load_dataset("binary_adult", prepared_dir), 30, seed=0)


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """One small real study (smoke profile, 2 trials) on the paper's three-class recipe.

    Read-only for tests: tests that add trials make their own study.
    """
    from automl_cxr.study import SearchSettings, run_search

    db = tmp_path_factory.mktemp("smoke-study") / "s.db"
    run_search(
        SearchSettings(
            dataset="three_class",
            trials=2,
            data_dir=prepared_dir,
            storage=str(db),
            profile="smoke",
        )
    )
    return db


@pytest.fixture
def offline_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access and no weight files configured by the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in list(os.environ):
        if key.startswith("AUTOML_CXR_WEIGHTS"):
            monkeypatch.delenv(key)
