"""benchmarks/search_speed.py: both sides run on real data, and the comparison is computed
from the curves it records (so the benchmark cannot rot)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location(
        "search_speed", REPO / "benchmarks" / "search_speed.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_both_curves_and_the_ratio(prepared_dir, tmp_path, capsys) -> None:
    mod = _load()
    out = tmp_path / "speed"
    assert mod.main(["--quick", "--data-dir", str(prepared_dir), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert "plotly" in out.with_suffix(".html").read_text().lower()
    for side in ("ours", "naive"):
        r = res[side]
        assert r["trials"], side
        secs = [t["seconds"] for t in r["trials"]]
        assert secs == sorted(secs) and secs[0] >= 0 and secs[-1] <= r["wall_seconds"] + 1
        bests = [p["best"] for p in r["best_curve"]]
        assert bests == sorted(bests) and (not bests or bests[-1] == r["best"])
    assert res["command"].endswith("--quick --data-dir " + str(prepared_dir) + " --out " + str(out))
    best = res["ours"]["best_trial"]
    if res["ours"]["best"] is not None:  # the best trial, with its interval over folds
        assert best["balanced_accuracy"]["mean"] == pytest.approx(res["ours"]["best"])
        lo, hi = best["balanced_accuracy"]["ci_low"], best["balanced_accuracy"]["ci_high"]
        assert lo is None or lo <= res["ours"]["best"] <= hi
        assert best["number"] == res["ours"]["best_curve"][-1]["trial"]
    # the naive side never prunes and never uses the feature cache
    assert res["naive"]["counts"]["PRUNED"] == 0
    assert res["ours"]["counts"]["COMPLETE"] + res["ours"]["counts"]["PRUNED"] >= 1
    cmp_ = res["comparison"]
    assert cmp_ == mod.compare(res["ours"], res["naive"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ratio"] == cmp_["ratio"]


def test_compare_finds_the_first_time_ours_reached_the_naive_best() -> None:
    mod = _load()
    ours = {"best_curve": [{"seconds": 5, "best": 0.5}, {"seconds": 9, "best": 0.8}]}
    naive = {"best": 0.7, "wall_seconds": 90.0}
    assert mod.compare(ours, naive) == {"naive_best": 0.7, "time_to_naive_best": 9, "ratio": 0.1}
    assert mod.compare(ours, {"best": 0.9, "wall_seconds": 90.0})["ratio"] is None
    assert mod.compare(ours, {"best": None, "wall_seconds": 9.0})["ratio"] is None


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # studies/ and caches stay out of the checkout
