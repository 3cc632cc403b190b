"""benchmarks/gpu_check.py runs (dry, on the CPU) so it is ready when a GPU is lent (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "dry.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry", "--out", str(out),
         *extra],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_dry_run_measures_the_data_path_and_the_cache(tmp_path: Path) -> None:
    res = _run(tmp_path, "--skip-sharing")
    assert res["dry"] is True and res["device"] == "cpu"
    assert [r["backbone"] for r in res["data_path"]] == ["test_efficientnet", "test_resnet"]
    for r in res["data_path"]:
        assert r["trial_images_per_second"] > 0 and r["raw_images_per_second"] > 0
        assert r["efficiency"] == pytest.approx(
            r["trial_images_per_second"] / r["raw_images_per_second"], abs=1e-3
        )
    assert res["cache"]["cache_used"] and res["cache"]["same_metrics"]


@pytest.mark.slow
def test_dry_run_with_ray_sharing(tmp_path: Path) -> None:
    res = _run(tmp_path)
    share = res["sharing"]
    assert share["workers_1"]["trials"] == 2 and share["workers_2"]["trials"] == 4
    assert share["aggregate_speedup"] > 0


def test_without_cuda_it_refuses_instead_of_faking(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x").exists()
