"""Metrics against scikit-learn/scipy and hand-computed examples; fold summaries and bootstrap."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from automl_cxr.engine._inference import (
    bootstrap_metrics,
    corrected_paired_ttest,
    summarize_folds,
)
from automl_cxr.engine._metrics import (
    SCALAR_METRICS,
    WeightedEvaluator,
    compute_metrics,
    flatten_per_class,
    roc_curves,
    scalar_metrics,
)
from automl_cxr.errors import ConfigError

FOUR = ["covid", "normal", "bacterial", "viral"]


def _probs_from_pred(y_pred: list[int], n_cls: int) -> np.ndarray:
    p = np.full((len(y_pred), n_cls), 0.1)
    p[np.arange(len(y_pred)), y_pred] = 0.8
    return p / p.sum(axis=1, keepdims=True)


def _synthetic(n: int, n_cls: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_cls, n)
    logits = rng.normal(size=(n, n_cls))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _plain(obj: object) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return type(obj) in (int, float, str, bool)


# ----------------------------------------------------------------------------- compute_metrics


def test_hand_computed_three_class() -> None:
    classes = ["covid", "normal", "pneumonia"]
    y_true = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
    m = compute_metrics(y_true, _probs_from_pred(y_pred, 3), classes)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["n"] == 10 and m["classes"] == classes
    assert m["accuracy"] == pytest.approx(0.7)
    # covid: TP=3 FN=1 FP=1 TN=5; normal and pneumonia: TP=2 FN=1 FP=1 TN=6.
    assert m["covid_sensitivity"] == pytest.approx(3 / 4)
    assert m["covid_specificity"] == pytest.approx(5 / 6)
    assert m["covid_accuracy"] == pytest.approx((3 + 5) / 10)  # the paper's "2-class accuracy"
    pc = m["per_class"]
    assert pc["covid"] == pytest.approx(
        {
            "sensitivity": 0.75,
            "specificity": 5 / 6,
            "precision": 0.75,
            "f1": 0.75,
            # 24 pos/neg pairs: 15 wins, 3 + 5 ties at 1/2 -> 19/24.
            "auc": 19 / 24,
            "support": 4,
        }
    )
    for label in ("normal", "pneumonia"):
        assert pc[label]["sensitivity"] == pytest.approx(2 / 3)
        assert pc[label]["specificity"] == pytest.approx(6 / 7)
        assert pc[label]["precision"] == pytest.approx(2 / 3)
        assert pc[label]["support"] == 3
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    assert _plain(m)
    json.dumps(m)


def test_against_sklearn_four_class() -> None:
    y, p = _synthetic(500, 4, seed=1)
    m = compute_metrics(y, p, FOUR)
    pred = p.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred)
    for k, label in enumerate(FOUR):
        pc = m["per_class"][label]
        assert pc["sensitivity"] == pytest.approx(rec[k])
        assert pc["precision"] == pytest.approx(prec[k])
        assert pc["f1"] == pytest.approx(f1[k])
        assert pc["support"] == sup[k]
        assert pc["auc"] == pytest.approx(roc_auc_score(y == k, p[:, k]))
        neg = y != k
        assert pc["specificity"] == pytest.approx(np.mean(pred[neg] != k))
    assert m["covid_sensitivity"] == m["per_class"]["covid"]["sensitivity"]
    assert _plain(m)


def test_binary() -> None:
    y, p = _synthetic(300, 2, seed=2)
    classes = ["covid", "non_covid"]
    m = compute_metrics(y, p, classes)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    pred = p.argmax(axis=1)
    assert m["covid_sensitivity"] == pytest.approx(np.mean(pred[y == 0] == 0))
    assert m["covid_specificity"] == pytest.approx(np.mean(pred[y == 1] == 1))
    # 1-D probabilities of classes[1] are accepted for two classes.
    m1 = compute_metrics(y, p[:, 1], classes)
    assert m1["auc"] == pytest.approx(m["auc"])
    assert m1["confusion_matrix"] == m["confusion_matrix"]


def test_class_missing_from_y_true_never_crashes() -> None:
    classes = ["covid", "normal", "viral"]
    y_true = np.array([0, 0, 0, 1, 1, 1, 1])
    y_prob = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.4, 0.5, 0.1],
            [0.2, 0.2, 0.6],
            [0.1, 0.8, 0.1],
            [0.3, 0.6, 0.1],
            [0.6, 0.3, 0.1],
            [0.1, 0.3, 0.6],
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y_true, y_prob, classes)
    viral = m["per_class"]["viral"]
    assert viral["support"] == 0 and math.isnan(viral["sensitivity"]) and math.isnan(viral["auc"])
    assert viral["specificity"] == pytest.approx(5 / 7)  # predicted viral twice out of 7 negatives
    # AUC and balanced accuracy use the classes present in y_true only.
    expected_auc = np.mean([roc_auc_score(y_true == k, y_prob[:, k]) for k in (0, 1)])
    assert m["auc"] == pytest.approx(expected_auc)
    pred = y_prob.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, pred, average="macro"))
    json.dumps(m)

    only_covid = compute_metrics([0, 0, 0], y_prob[:3], classes)
    assert math.isnan(only_covid["auc"]) and math.isnan(only_covid["covid_specificity"])
    assert only_covid["covid_sensitivity"] == pytest.approx(1 / 3)


def test_positive_class_keys() -> None:
    y, p = _synthetic(60, 3, seed=3)
    kermany = ["normal", "bacterial", "viral"]
    m = compute_metrics(y, p, kermany)
    assert "covid_sensitivity" not in m and "covid_specificity" not in m
    m = compute_metrics(y, p, kermany, positive="viral")
    assert m["covid_sensitivity"] == m["per_class"]["viral"]["sensitivity"]
    assert "covid_sensitivity" not in compute_metrics(y, p, FOUR[:3], positive=None)


def test_flatten_and_scalar_metrics() -> None:
    y, p = _synthetic(80, 4, seed=4)
    m = compute_metrics(y, p, FOUR)
    flat = flatten_per_class(m)
    assert flat["sensitivity_covid"] == m["per_class"]["covid"]["sensitivity"]
    assert flat["specificity_viral"] == m["per_class"]["viral"]["specificity"]
    assert len(flat) == 8
    s = scalar_metrics(m)
    assert list(s)[: len(SCALAR_METRICS)] == list(SCALAR_METRICS)
    assert scalar_metrics(s) == s  # idempotent on flat dicts


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([0, 3], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"]), r"0\.\.1.*\[3\]"),
        (([0, 1], [[0.5, 0.5]], ["a", "b"]), r"\(2, 2\).*\(1, 2\)"),
        (([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a"]), "at least 2 labels"),
        (([], np.zeros((0, 2)), ["a", "b"]), "must not be empty"),
        (([0, 1], [[np.nan, 0.5], [0.5, 0.5]], ["a", "b"]), "finite"),
        (([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"]), "integer class indices"),
    ],
)
def test_compute_metrics_validation(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compute_metrics(*args)


# ----------------------------------------------------------------------------- roc_curves


def test_roc_curves() -> None:
    y, p = _synthetic(400, 4, seed=5)
    curves = roc_curves(y, p, FOUR, max_points=20)
    assert list(curves) == FOUR
    for k, label in enumerate(FOUR):
        c = curves[label]
        assert 2 <= len(c["fpr"]) == len(c["tpr"]) <= 20
        assert (c["fpr"][0], c["tpr"][0]) == (0.0, 0.0) and (c["fpr"][-1], c["tpr"][-1]) == (1, 1)
        assert np.all(np.diff(c["fpr"]) >= 0) and np.all(np.diff(c["tpr"]) >= 0)
        assert c["auc"] == pytest.approx(roc_auc_score(y == k, p[:, k]))
    assert _plain(curves) and len(json.dumps(curves)) < 8000
    partial = roc_curves([0, 0, 1], p[:3, :3], FOUR[:3])
    assert partial["bacterial"]["fpr"] == [] and math.isnan(partial["bacterial"]["auc"])
    with pytest.raises(ConfigError, match="max_points=1"):
        roc_curves(y, p, FOUR, max_points=1)


# ----------------------------------------------------------------------------- summarize_folds


def test_summarize_folds_against_scipy() -> None:
    folds = [compute_metrics(*_synthetic(100, 4, seed=s), FOUR) for s in range(10)]
    summary = summarize_folds(folds, confidence=0.9)
    assert summary["n_folds"] == 10 and summary["classes"] == FOUR
    acc = summary["metrics"]["accuracy"]
    values = np.array([f["accuracy"] for f in folds])
    assert acc["folds"] == pytest.approx(values.tolist())
    assert acc["mean"] == pytest.approx(values.mean())
    assert acc["std"] == pytest.approx(values.std(ddof=1))
    lo, hi = stats.t.interval(0.9, 9, loc=values.mean(), scale=stats.sem(values))
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx((lo, hi))
    assert acc["n"] == 10 and acc["n_nan"] == 0
    assert {"sensitivity_covid", "specificity_normal", "covid_sensitivity"} <= set(
        summary["metrics"]
    )
    expected_cm = np.sum([f["confusion_matrix"] for f in folds], axis=0)
    assert summary["confusion_matrix"] == expected_cm.tolist()
    assert summary["confusion_matrix"][0][0] == sum(f["confusion_matrix"][0][0] for f in folds)
    json.dumps(summary)


def test_summarize_folds_nan_and_single_fold() -> None:
    folds = [
        {"accuracy": 0.8, "auc": float("nan")},
        {"accuracy": 0.9, "auc": 0.95},
        {"accuracy": 0.7, "auc": 0.85},
    ]
    s = summarize_folds(folds)
    auc = s["metrics"]["auc"]
    assert auc["n"] == 2 and auc["n_nan"] == 1 and auc["mean"] == pytest.approx(0.9)
    lo, hi = stats.t.interval(0.95, 1, loc=0.9, scale=stats.sem([0.95, 0.85]))
    assert (auc["ci_low"], auc["ci_high"]) == pytest.approx((lo, hi))
    assert math.isnan(auc["folds"][0])
    assert s["confusion_matrix"] is None

    one = summarize_folds([{"accuracy": 0.8}])["metrics"]["accuracy"]
    assert one == {
        "mean": 0.8,
        "std": 0.0,
        "ci_low": 0.8,
        "ci_high": 0.8,
        "n": 1,
        "n_nan": 0,
        "folds": [0.8],
    }
    none = summarize_folds([{"auc": float("nan")}])["metrics"]["auc"]
    assert none["n"] == 0 and math.isnan(none["mean"]) and math.isnan(none["ci_low"])
    const = summarize_folds([{"accuracy": 0.5}, {"accuracy": 0.5}])["metrics"]["accuracy"]
    assert (const["std"], const["ci_low"], const["ci_high"]) == (0.0, 0.5, 0.5)
    with pytest.raises(ConfigError, match="at least one fold"):
        summarize_folds([])
    with pytest.raises(ConfigError, match="confidence=1.5"):
        summarize_folds([{"accuracy": 0.5}], confidence=1.5)


def test_summarize_folds_corrected_resampled_t_by_hand() -> None:
    """Nadeau & Bengio (2003): variance x (1/J + n_val/n_train), t on J-1 degrees of freedom."""
    values = np.array([0.81, 0.86, 0.78, 0.90, 0.84])
    sizes = [(400, 100), (401, 99), (399, 101), (400, 100), (400, 100)]
    folds = [
        {"accuracy": v, "n_train": nt, "n_val": nv}
        for v, (nt, nv) in zip(values, sizes, strict=True)
    ]
    s = summarize_folds(folds, confidence=0.95)
    ratio = np.mean([nv / nt for nt, nv in sizes])
    se = math.sqrt(values.var(ddof=1) * (1 / 5 + ratio))
    half = stats.t.ppf(0.975, 4) * se
    acc = s["metrics"]["accuracy"]
    assert s["ci_method"] == "corrected_t" and s["test_train_ratio"] == pytest.approx(ratio)
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx(
        (values.mean() - half, values.mean() + half)
    )
    naive = stats.t.interval(0.95, 4, loc=values.mean(), scale=stats.sem(values))
    assert acc["ci_high"] - acc["ci_low"] > 1.5 * (naive[1] - naive[0])  # 5-fold: ~1.58x wider
    given = summarize_folds([{"accuracy": v} for v in values], test_train_ratio=0.25)
    assert given["ci_method"] == "corrected_t"
    assert given["metrics"]["accuracy"]["ci_high"] == pytest.approx(
        values.mean() + stats.t.ppf(0.975, 4) * math.sqrt(values.var(ddof=1) * (0.2 + 0.25))
    )
    plain = summarize_folds([{"accuracy": v} for v in values])
    assert plain["ci_method"] == "t" and plain["test_train_ratio"] is None
    with pytest.raises(ConfigError, match="test_train_ratio must be a positive number"):
        summarize_folds(folds, test_train_ratio=-1)


def test_corrected_paired_ttest_by_hand() -> None:
    rng = np.random.default_rng(3)
    a = rng.uniform(0.8, 0.9, 5)
    b = a - rng.uniform(-0.01, 0.03, 5)
    d = a - b
    t = d.mean() / math.sqrt((1 / 5 + 100 / 400) * d.var(ddof=1))
    r = corrected_paired_ttest(a, b, n_train=400, n_val=100)
    assert r["t"] == pytest.approx(t) and r["n"] == 5 and r["method"] == "corrected_t"
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), 4))
    less = corrected_paired_ttest(a, b, [400] * 5, [100] * 5, alternative="less")
    assert less["p_value"] == pytest.approx(stats.t.cdf(t, 4))
    greater = corrected_paired_ttest(a, b, 400, 100, alternative="greater")
    assert greater["p_value"] == pytest.approx(stats.t.sf(t, 4))
    # the correction can only make the test less certain than the naive paired t-test
    assert r["p_value"] > stats.ttest_rel(a, b).pvalue
    assert corrected_paired_ttest(a, a, 400, 100)["p_value"] == 1.0
    assert math.isnan(corrected_paired_ttest([0.8], [0.7], 400, 100)["p_value"])
    with pytest.raises(ConfigError, match="n_train must be a positive size"):
        corrected_paired_ttest(a, b, n_train=0, n_val=100)
    with pytest.raises(ConfigError, match="same length"):
        corrected_paired_ttest(a, b[:3], 400, 100)


# ----------------------------------------------------------------------------- bootstrap


def test_weighted_evaluator_matches_compute_metrics() -> None:
    rng = np.random.default_rng(60)
    y, p = _synthetic(300, 4, seed=6)
    p = np.round(p, 1)  # many tied scores (AUC counts ties 1/2, argmax takes the first)
    ev = WeightedEvaluator(y, p)
    got = ev.scalars(np.ones((1, y.size)), FOUR, 0)
    expected = scalar_metrics(compute_metrics(y, p, FOUR))
    for name, value in expected.items():
        assert got[name][0] == pytest.approx(value, nan_ok=True), name
    # Integer weights are the same as repeating images.
    w = rng.integers(0, 4, size=y.size)
    w_no_covid = np.where(y == 0, 0, w)  # a class absent from the resample
    for weights in (w, w_no_covid):
        rep = np.repeat(np.arange(y.size), weights)
        got = ev.scalars(weights[None, :].astype(float), FOUR, 0)
        expected = scalar_metrics(compute_metrics(y[rep], p[rep], FOUR))
        for name, value in expected.items():
            assert got[name][0] == pytest.approx(value, nan_ok=True), name
    assert math.isnan(got["covid_sensitivity"][0]) and not math.isnan(got["auc"][0])


def test_bootstrap_ci_contains_estimate_deterministic_and_narrows() -> None:
    y, p = _synthetic(200, 4, seed=7)
    r = bootstrap_metrics(y, p, FOUR, n_boot=300, seed=1)
    point = scalar_metrics(compute_metrics(y, p, FOUR))
    assert r["unit"] == "image" and r["n_units"] == 200 and r["n_boot"] == 300
    assert list(r["metrics"]) == list(point)
    for name, v in r["metrics"].items():
        assert v["estimate"] == pytest.approx(point[name])
        assert v["ci_low"] <= v["estimate"] <= v["ci_high"], name
        assert v["n_valid"] == 300
    assert bootstrap_metrics(y, p, FOUR, n_boot=300, seed=1) == r
    assert bootstrap_metrics(y, p, FOUR, n_boot=300, seed=2) != r
    assert _plain(r)

    y_big, p_big = _synthetic(2000, 4, seed=7)
    big = bootstrap_metrics(y_big, p_big, FOUR, n_boot=300, seed=1)
    for name in ("accuracy", "auc", "covid_sensitivity"):
        small_w = r["metrics"][name]["ci_high"] - r["metrics"][name]["ci_low"]
        big_w = big["metrics"][name]["ci_high"] - big["metrics"][name]["ci_low"]
        assert big_w < 0.6 * small_w, name


def test_bootstrap_over_patients() -> None:
    # 60 patients x 5 near-identical images: resampling images understates the uncertainty.
    rng = np.random.default_rng(8)
    y_pat = rng.integers(0, 2, 60)
    score_pat = np.clip(0.5 + 0.25 * (2 * y_pat - 1) + rng.normal(0, 0.3, 60), 0, 1)
    y = np.repeat(y_pat, 5)
    score = np.repeat(score_pat, 5)
    groups = np.repeat([f"p{i}" for i in range(60)], 5)
    by_img = bootstrap_metrics(y, score, ["covid", "non_covid"], n_boot=400, seed=0)
    by_pat = bootstrap_metrics(y, score, ["covid", "non_covid"], n_boot=400, seed=0, groups=groups)
    assert by_pat["unit"] == "patient" and by_pat["n_units"] == 60
    for name in ("accuracy", "auc"):
        assert by_pat["metrics"][name]["estimate"] == by_img["metrics"][name]["estimate"]
        w_img = by_img["metrics"][name]["ci_high"] - by_img["metrics"][name]["ci_low"]
        w_pat = by_pat["metrics"][name]["ci_high"] - by_pat["metrics"][name]["ci_low"]
        assert w_pat > 1.5 * w_img, name
    with pytest.raises(ConfigError, match="groups must have one entry per image"):
        bootstrap_metrics(y, score, ["covid", "non_covid"], groups=groups[:-1])


def test_bootstrap_rare_class_and_bad_args() -> None:
    y = np.array([0] + [1] * 39)  # one covid image: most resamples have none
    p = np.column_stack([np.linspace(0, 1, 40), 1 - np.linspace(0, 1, 40)])
    r = bootstrap_metrics(y, p, ["covid", "normal"], n_boot=200, seed=0)
    sens = r["metrics"]["covid_sensitivity"]
    assert 0 < sens["n_valid"] < 200
    assert math.isnan(r["metrics"]["auc"]["estimate"]) is False
    with pytest.raises(ConfigError, match="n_boot=0"):
        bootstrap_metrics(y, p, ["covid", "normal"], n_boot=0)


def test_bootstrap_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 images, 1,000 resamples: the vectorised chunks give the same intervals as chunks
    of a few resamples (the speed itself is measured in benchmarks/bootstrap_speed.py)."""
    import automl_cxr.engine._inference as metrics_mod

    y, p = _synthetic(2000, 4, seed=9)
    groups = (np.arange(2000) // 3).astype(str)
    big = bootstrap_metrics(y, p, FOUR, n_boot=1000, groups=groups)
    monkeypatch.setattr(metrics_mod, "_BOOT_CHUNK_CELLS", 2000 * 7)
    small = bootstrap_metrics(y, p, FOUR, n_boot=1000, groups=groups)
    assert small == big and big["n_units"] == 667


# ----------------------------------------------------------------------------- paired t-test


def test_one_paired_t_test_the_plain_one_is_its_zero_overlap_case() -> None:
    """Issue 25: `paired_comparison` (the plain paired t-test) sat beside the corrected one and
    was used nowhere but here; it is gone. With no training overlap (n_val/n_train -> 0) the
    corrected test is scipy's `ttest_rel`."""
    import automl_cxr.engine as engine

    assert not hasattr(engine, "paired_comparison")
    rng = np.random.default_rng(10)
    a = rng.uniform(0.8, 0.9, 10)
    b = a - rng.uniform(0.0, 0.03, 10)
    r = corrected_paired_ttest(a, b, n_train=1e12, n_val=1e-12)
    ref = stats.ttest_rel(a, b)
    assert r["t"] == pytest.approx(ref.statistic) and r["p_value"] == pytest.approx(ref.pvalue)
    assert r["mean_diff"] == pytest.approx(np.mean(a - b)) and r["n"] == 10
    greater = corrected_paired_ttest(a, b, 1e12, 1e-12, alternative="greater")
    assert greater["p_value"] == pytest.approx(stats.ttest_rel(a, b, alternative="greater").pvalue)
    # NaN folds are dropped pairwise
    x = [0.8, float("nan"), 0.85, 0.9, 0.7]
    y = [0.75, 0.8, float("nan"), 0.88, 0.71]
    r = corrected_paired_ttest(x, y, 1e12, 1e-12)
    ref = stats.ttest_rel([0.8, 0.9, 0.7], [0.75, 0.88, 0.71])
    assert r["n"] == 3 and r["p_value"] == pytest.approx(ref.pvalue)
    with pytest.raises(ConfigError, match="same length, but got 2 and 3"):
        corrected_paired_ttest([0.1, 0.2], [0.1, 0.2, 0.3], 10, 5)
    with pytest.raises(ConfigError, match="alternative='bigger'"):
        corrected_paired_ttest([0.1, 0.2], [0.1, 0.2], 10, 5, alternative="bigger")


def test_one_cluster_bootstrap_for_metrics_calibration_and_thresholds() -> None:
    """Issue 25: the patient bootstrap is written once (engine), chunked or not the same
    seeded stream; every replicate draws as many patients as there are, all their images."""
    from automl_cxr.engine import bootstrap_weights, group_bootstrap_weights

    groups = np.array(["p1", "p2", "p2", "p3", "p4", "p4", "p4", "p5"], dtype=object)
    whole = group_bootstrap_weights(groups, 37, seed=3)
    _, inv = np.unique(groups.astype(str), return_inverse=True)
    chunked = np.concatenate(list(bootstrap_weights(inv, 5, 37, 3, chunk=4)))
    assert whole.shape == (37, 8) and np.array_equal(whole, chunked)
    # a patient's images carry one weight; the weights count 5 patient draws per replicate
    assert (whole[:, 1] == whole[:, 2]).all() and (whole[:, 4] == whole[:, 6]).all()
    per_patient = whole[:, [0, 1, 3, 4, 7]]
    assert (per_patient.sum(axis=1) == 5).all()
