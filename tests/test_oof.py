"""Out-of-fold predictions stored per COMPLETE trial of a real smoke study, and what is computed
from them: calibration (checked against scikit-learn), operating points, ensemble selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from optuna.trial import TrialState

from automl_cxr.deploy import open_trial, training_data
from automl_cxr.engine import compute_metrics, scalar_metrics
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.oof import (
    apply_temperature,
    artifact_dir,
    calibration_summary,
    caruana_select,
    choose_threshold,
    decide,
    ece,
    fit_temperature,
    fold_score,
    load_oof,
    load_study_oof,
    metric_scorer,
    nested_selection,
    operating_point,
    parse_operating_point,
)
from automl_cxr.study import load_study


@pytest.fixture(scope="module")
def oofs(smoke_study: Path):
    study = load_study(smoke_study)
    found = load_study_oof(study, smoke_study)
    assert found, "the smoke study stored no out-of-fold predictions"
    return study, found


def _valid(oofs):
    study, found = oofs
    return study, {n: o.valid() for n, o in found.items()}


def test_every_complete_trial_stores_its_oof_row_aligned(smoke_study: Path, prepared_dir, oofs):
    study, found = oofs
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(found) == sorted(t.number for t in complete)
    assert artifact_dir(smoke_study) == smoke_study.with_name(smoke_study.stem + ".artifacts")
    spec = open_trial(smoke_study)
    ds = training_data(spec, prepared_dir)
    for t in complete:
        info = t.user_attrs["oof"]
        o = found[t.number]
        assert info["stored"] and info["dataset_hash"] == ds.hash == o.dataset_hash
        assert o.probs.shape == (len(ds), len(ds.classes)) and info["rows"] == len(ds)
        assert np.array_equal(o.labels, ds.labels)
        assert info["bytes"] < 8 * len(ds) * len(ds.classes) + 4096  # compact
        v = o.valid()
        assert np.allclose(v.probs.sum(axis=1), 1.0)
        # a patient never straddles folds
        for g in np.unique(v.groups):
            assert len(np.unique(v.folds[v.groups == g])) == 1
        # the study metric recomputed from the stored predictions is the trial's value
        scorer = metric_scorer("balanced_accuracy", o.classes, "covid")
        assert fold_score(v.probs, v.labels, v.folds, scorer, set(np.unique(v.folds))) == (
            pytest.approx(t.value, abs=1e-6)
        )
        # the pooled metrics the objective recorded come from the same predictions
        pooled = compute_metrics(v.labels, v.probs, o.classes, positive="covid")
        assert pooled["confusion_matrix"] == t.user_attrs["metrics"]["pooled"]["confusion_matrix"]


def test_missing_oof_is_reported(smoke_study: Path, tmp_path: Path, monkeypatch, oofs) -> None:
    study, _ = oofs
    t = study.get_trials(states=(TrialState.COMPLETE,))[0]
    monkeypatch.setenv("AUTOML_CXR_ARTIFACTS", str(tmp_path / "nowhere"))
    assert load_oof(t, smoke_study) is None
    with pytest.raises(StorageError, match="no stored out-of-fold predictions"):
        load_oof(t, smoke_study, required=True)


def _sklearn_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """ECE from scikit-learn's calibration_curve on the top label, weighted by bin counts."""
    from sklearn.calibration import calibration_curve

    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(int)
    frac, mean = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
    ids = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], conf)
    counts = np.bincount(ids, minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts * np.abs(frac - mean)) / counts.sum())


def test_calibration_matches_scikit_learn(oofs) -> None:
    from sklearn.metrics import brier_score_loss, log_loss

    _, valid = _valid(oofs)
    for v in valid.values():
        for bins in (5, 10, 15):
            assert ece(v.probs, v.labels, bins) == pytest.approx(
                _sklearn_ece(v.probs, v.labels, bins), abs=1e-6
            )
        c = calibration_summary(
            v.probs, v.labels, groups=v.groups, classes=v.classes, positive="covid", n_boot=200
        )
        assert c["ece_ci_low"] <= c["ece"] <= c["ece_ci_high"]
        onehot = np.eye(len(v.classes))[v.labels]
        assert c["brier"] == pytest.approx(brier_score_loss(v.labels, v.probs))
        assert c["brier"] == pytest.approx(np.mean(np.sum((v.probs - onehot) ** 2, axis=1)))
        assert c["nll"] == pytest.approx(log_loss(v.labels, v.probs, labels=[0, 1, 2]), abs=1e-6)
        rel = c["reliability"]
        assert sum(rel["count"]) == len(v.labels)
        assert len(rel["confidence"]) == len(rel["accuracy"]) == len(rel["count"])
        assert sum(c["reliability_positive"]["count"]) == len(v.labels)


def test_temperature_scaling_never_worse_and_matches_a_scaled_softmax(oofs) -> None:
    _, valid = _valid(oofs)
    for v in valid.values():
        fit = fit_temperature(v.probs, v.labels)
        assert fit["nll_after"] <= fit["nll_before"] + 1e-12
        t = fit["temperature"]
        ref = torch.softmax(torch.log(torch.from_numpy(v.probs).clamp_min(1e-12)) / t, 1).numpy()
        assert np.allclose(apply_temperature(v.probs, t), ref)
    with pytest.raises(ConfigError, match="temperature must be positive"):
        apply_temperature(v.probs, 0.0)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_threshold_meets_the_asked_sensitivity_on_its_data(oofs, target: float) -> None:
    _, valid = _valid(oofs)
    for v in valid.values():
        k = v.classes.index("covid")
        pos = v.labels == k
        s = v.probs[:, k]
        t = choose_threshold(s, pos, "sensitivity", target)
        assert np.mean(s[pos] >= t) >= target
        higher = s[s > t]
        if higher.size:  # the next higher candidate no longer meets it: best specificity
            assert np.mean(s[pos] >= higher.min()) < target
        op = operating_point(
            v.probs, v.labels, k, "sensitivity", target, groups=v.groups, n_boot=200
        )
        assert op["sensitivity"] >= target
        assert op["sensitivity_ci_low"] <= op["sensitivity"] <= op["sensitivity_ci_high"]
        dec = decide(v.probs, k, t)
        assert np.mean(dec[pos] == k) == pytest.approx(op["sensitivity"])
        assert np.mean(dec[~pos] != k) == pytest.approx(op["specificity"])
        ts = choose_threshold(s, pos, "specificity", target)
        assert np.mean(s[~pos] < ts) >= target
        ty = choose_threshold(s, pos, "youden", None)
        j = np.mean(s[pos] >= ty) + np.mean(s[~pos] < ty)
        assert all(j >= np.mean(s[pos] >= c) + np.mean(s[~pos] < c) - 1e-12 for c in s)


def test_parse_operating_point() -> None:
    assert parse_operating_point("sensitivity=0.95") == ("sensitivity", 0.95)
    assert parse_operating_point(" Specificity = 0.9") == ("specificity", 0.9)
    assert parse_operating_point("youden") == ("youden", None)
    for bad, msg in (
        ("sensitivity=1.5", "in \\(0, 1\\)"),
        ("ppv=0.9", "must be"),
        ("sensitivity=x", "must be a number"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_operating_point(bad)


@pytest.mark.parametrize(
    "metric",
    ["balanced_accuracy", "accuracy", "macro_f1", "covid_sensitivity", "covid_accuracy", "auc"],
)
def test_fast_scorer_is_the_engine_metric(oofs, metric: str) -> None:
    _, valid = _valid(oofs)
    for v in valid.values():
        fast = metric_scorer(metric, v.classes, "covid")
        for f in np.unique(v.folds):
            m = v.folds == f
            ref = scalar_metrics(
                compute_metrics(v.labels[m], v.probs[m], v.classes, positive="covid")
            )[metric]
            assert fast(v.labels[m], v.probs[m]) == pytest.approx(ref)


def test_ensemble_selection_never_below_its_best_member(oofs) -> None:
    _, valid = _valid(oofs)
    first = next(iter(valid.values()))
    probs = {n: v.probs for n, v in valid.items()}
    rng = np.random.default_rng(0)
    # more candidates: the real trials plus sharpened/blurred versions of them
    for n, v in list(valid.items()):
        probs[100 + n] = apply_temperature(v.probs, float(rng.uniform(0.3, 3.0)))
    for metric in ("balanced_accuracy", "accuracy", "auc"):
        scorer = metric_scorer(metric, first.classes, "covid")
        for rounds in (1, 5):
            sel = caruana_select(probs, first.labels, first.folds, scorer, n_rounds=rounds)
            assert sel["score"] >= max(sel["single_scores"].values()) - 1e-12
            assert sum(sel["weights"].values()) == pytest.approx(1.0)
            mixed = sum(probs[k] * w for k, w in sel["weights"].items())
            use = set(np.unique(first.folds))
            assert fold_score(mixed, first.labels, first.folds, scorer, use) == pytest.approx(
                sel["score"]
            )
    nested = nested_selection(
        probs,
        first.labels,
        first.folds,
        metric_scorer("balanced_accuracy", first.classes, "covid"),
        n_rounds=5,
    )
    assert nested["available"] and len(nested["ensemble"]["folds"]) == len(use)
    with pytest.raises(ConfigError, match="at least 1 round"):
        caruana_select(probs, first.labels, first.folds, scorer, n_rounds=0)


def test_fast_auc_on_two_classes_is_the_engine_auc(oofs) -> None:
    _, valid = _valid(oofs)
    for v in valid.values():
        keep = v.labels < 2  # covid vs bacterial, renormalised
        p = v.probs[keep][:, :2] / v.probs[keep][:, :2].sum(axis=1, keepdims=True)
        y = v.labels[keep]
        classes = v.classes[:2]
        ref = scalar_metrics(compute_metrics(y, p, classes, positive="covid"))["auc"]
        assert metric_scorer("auc", classes, "covid")(y, p) == pytest.approx(ref)


def test_unwritable_artifact_folder_does_not_fail_the_trial(
    prepared_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A trial whose predictions cannot be written still completes; `oof` says why."""
    from automl_cxr.study import SearchSettings, run_search

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("AUTOML_CXR_ARTIFACTS", str(blocker / "sub"))
    db = tmp_path / "s.db"
    run_search(
        SearchSettings(
            dataset="three_class",
            trials=1,
            data_dir=prepared_dir,
            storage=str(db),
            profile="smoke",
            pruner="none",
        )
    )
    (t,) = load_study(db).get_trials()
    assert t.state == TrialState.COMPLETE
    assert t.user_attrs["oof"]["stored"] is False and "cannot" in t.user_attrs["oof"]["reason"]


# ------------------------------------------------ stored folds are the folds the trial used


@pytest.fixture(scope="module")
def adult_small(prepared_dir):
    """binary_adult, 40 images per class by patient: Cohen sites and NIH, so site CV works."""
    from automl_cxr.data import load_dataset
    from automl_cxr.study import subsample

    return subsample(load_dataset("binary_adult", prepared_dir), 40, seed=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(cv="patient", n_folds=3),
        dict(cv="site", n_folds=3),
        dict(cv="site", n_folds=40),  # not feasible: falls back to fewer folds
        dict(cv="patient", n_folds=3, holdout=0.25),
        dict(cv="site", n_folds=3, max_folds=2),
    ],
    ids=["patient", "site", "site-fallback", "holdout", "site-max-folds"],
)
def test_oof_folds_are_the_val_indices_the_trial_used(adult_small, kw) -> None:
    """Fails on the code before the fix: the store recomputed folds with the patient splitter,
    so under --cv site its fold 0 was not the trial's fold 0 (and a holdout's rows were -1)."""
    from automl_cxr.engine import TrainConfig, run_trial
    from automl_cxr.models import ModelConfig
    from automl_cxr.oof import oof_arrays

    ds = adult_small
    cfg = TrainConfig(resolution=32, epochs=1, batch_size=32, lr=3e-3, seed=0, **kw)
    mc = ModelConfig(backbone="test_efficientnet", num_classes=2, pretrained=False)
    res = run_trial(ds, mc, cfg)
    folds = oof_arrays(res, ds)["folds"]
    expected = np.full(len(ds), -1)
    for i, rec in enumerate(res.splits):
        expected[np.asarray(rec["val_indices"])] = i
    assert np.array_equal(folds, expected)
    assert (folds >= 0).sum() == sum(len(r["val_indices"]) for r in res.splits)
    if kw.get("n_folds") == 40:
        assert res.warnings and len(res.splits) < 40


def test_site_cv_search_stores_the_folds_it_validated(prepared_dir: Path, tmp_path: Path):
    """The reproduction from issue 24 (there on four_class_mixed, whose smoke subsample no longer
    allows site CV once copies are merged): a site-CV smoke search's stored OOF folds equal the
    fold members recorded in the trial's metrics."""
    from automl_cxr.study import SearchSettings, run_search

    db = tmp_path / "site.db"
    run_search(
        SearchSettings(
            dataset="binary_adult",
            trials=1,
            data_dir=prepared_dir,
            storage=str(db),
            profile="smoke",
            pruner="none",
            cv="site",
        )
    )
    (t,) = load_study(db).get_trials(states=(TrialState.COMPLETE,))
    o = load_oof(t, db, required=True)
    splits = t.user_attrs["metrics"]["splits"]
    for i, rec in enumerate(splits):
        assert np.array_equal(np.flatnonzero(o.folds == i), np.sort(rec["val_indices"]))
    assert (o.folds >= 0).sum() == sum(len(r["val_indices"]) for r in splits)
    assert not o.folds_from_splits
    # an artifact written before the fix (fold ids of a patient splitter beside the site
    # folds' predictions) is read with the folds the trial recorded, and the report says so
    from automl_cxr.oof import artifact_store
    from automl_cxr.report import build_report_data

    aid = t.user_attrs["oof"]["artifact_id"]
    path = Path(str(db)).with_suffix(".artifacts") / aid
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    assert artifact_store(db) is not None and np.array_equal(arrays["folds"], o.folds)
    arrays["folds"] = np.where(arrays["folds"] >= 0, np.arange(len(o.folds)) % 3, -1)
    arrays["folds"] = arrays["folds"].astype(np.int8)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)
    old_ = load_oof(t, db, required=True)
    assert old_.folds_from_splits and np.array_equal(old_.folds, o.folds)
    assert old_.valid().folds_from_splits
    notes = build_report_data(load_study(db), storage=str(db)).notes
    assert any(f"trial(s) [{t.number}]" in n and "recorded splits" in n for n in notes)


def test_report_and_export_select_the_same_ensemble(oofs) -> None:
    """Issue 25: the report and `export --ensemble-select` each ran scorer → Caruana → nested
    selection; both now call `select_ensemble`, which is exactly that sequence."""
    from automl_cxr.oof import select_ensemble

    _, valid = _valid(oofs)
    first = next(iter(valid.values()))
    scorer = metric_scorer("balanced_accuracy", first.classes, "covid")
    probs = {n: v.probs for n, v in valid.items()}
    got = select_ensemble(oofs[1], metric="balanced_accuracy", positive="covid", rounds=5)
    sel = caruana_select(probs, first.labels, first.folds, scorer, n_rounds=5)
    assert {k: got[k] for k in sel} == sel
    assert got["nested"] == nested_selection(probs, first.labels, first.folds, scorer, n_rounds=5)
    assert got["candidates"] == len(valid) and got["n_rounds"] == 5
    weights = [m["weight"] for m in got["members"]]
    assert weights == sorted(weights, reverse=True)
    assert {m["number"]: m["weight"] for m in got["members"]} == sel["weights"]
