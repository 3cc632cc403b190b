"""Trial engine on real shared X-rays with tiny timm test models."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from automl_cxr.data import load_dataset
from automl_cxr.engine import FeatureCache, TrainConfig, make_splits, members_hash, run_trial
from automl_cxr.engine._trial import row_identities
from automl_cxr.errors import ConfigError, DataError, TrialFailed
from automl_cxr.models import ModelConfig, build_model, num_stages
from automl_cxr.study import subsample


@pytest.fixture(scope="module")
def small(prepared_dir):
    """three_class, 30 images per class taken by patient (fast, still real data)."""
    return subsample(load_dataset("three_class", prepared_dir), 30, seed=0)


def _cfg(**kw) -> TrainConfig:
    base = dict(resolution=48, epochs=2, batch_size=16, n_folds=2, lr=3e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _model(small, **kw) -> ModelConfig:
    base = dict(backbone="test_efficientnet", num_classes=len(small.classes), pretrained=False)
    base.update(kw)
    return ModelConfig(**base)


def test_trial_end_to_end_metrics_and_no_leakage(small) -> None:
    steps = []
    res = run_trial(small, _model(small), _cfg(), report=lambda s, v: steps.append((s, v)))
    assert [s for s, _ in steps] == [0, 1, 2, 3]  # fold * epochs + epoch
    assert len(res.folds) == 2 and len(res.curves) == 2
    summary = res.summary["metrics"]
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "auc",
        "covid_sensitivity",
        "covid_specificity",
    ):
        folds = summary[key]["folds"]
        assert summary[key]["mean"] == pytest.approx(np.nanmean(folds))
        assert summary[key]["ci_low"] <= summary[key]["mean"] <= summary[key]["ci_high"]
    for f in res.folds:
        cm = np.array(f["confusion_matrix"])
        assert f["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    # every image evaluated exactly once, out of fold, and no patient on both sides: checked on
    # the folds the trial recorded, not on folds recomputed here
    val = np.concatenate([np.array(r["val_indices"]) for r in res.splits])
    assert np.array_equal(np.sort(val), np.arange(len(small)))
    ids = row_identities(small)
    for r in res.splits:
        v = np.array(r["val_indices"])
        tr = np.setdiff1d(np.arange(len(small)), v)
        assert not set(small.groups[tr]) & set(small.groups[v])
        assert r["val_hash"] == members_hash(ids, v) and r["train_hash"] == members_hash(ids, tr)
        assert r["trained_hash"] == r["train_hash"] and r["n_trained_images"] == len(tr)
        assert r["inner_val_indices"] is None and r["cv"] == "patient"
        assert r["epochs_run"] == 2 and r["best_epoch"] == 1
    assert res.splits[0]["val_hash"] != res.splits[1]["val_hash"]
    assert res.pooled["n"] == len(small)
    assert res.params_trainable == res.params_total > 0
    assert res.latency_ms > 0 and res.images_per_second > 0
    assert res.value == summary["balanced_accuracy"]["mean"]
    # intervals use the corrected resampled t with the trial's own fold sizes
    assert res.summary["ci_method"] == "corrected_t"
    ratio = np.mean([s["n_val"] / s["n_train"] for s in res.splits])
    assert res.summary["test_train_ratio"] == pytest.approx(ratio)
    assert [f["n_val"] for f in res.folds] == [s["n_val"] for s in res.splits]


def test_same_seed_same_result(small) -> None:
    a = run_trial(small, _model(small), _cfg(augment=0.3))
    b = run_trial(small, _model(small), _cfg(augment=0.3))
    assert a.summary == b.summary
    clock = ("train_seconds",)  # wall-clock time per epoch: the one thing allowed to differ
    strip = [[{k: v for k, v in p.items() if k not in clock} for p in c] for c in a.curves]
    assert strip == [[{k: v for k, v in p.items() if k not in clock} for p in c] for c in b.curves]
    assert all("train_seconds" in p for c in a.curves for p in c)


def test_nan_loss_ends_trial_with_reason(small) -> None:
    with pytest.raises(TrialFailed, match="loss became") as exc:
        run_trial(small, _model(small), _cfg(optimizer="sgd", lr=1e12, momentum=0.9))
    assert exc.value.kind == "nan"


def test_pruning_callback_stops_trial(small) -> None:
    class Stop(Exception):
        pass

    def report(step: int, value: float) -> None:
        if step == 1:
            raise Stop

    with pytest.raises(Stop):
        run_trial(small, _model(small), _cfg(), report=report)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_feature_cache_hits_and_matches_uncached(small, backbone: str) -> None:
    n = num_stages(backbone)
    cache = FeatureCache()
    for frozen in (n, n - 1):
        mc = _model(small, backbone=backbone, frozen_stages=frozen)
        first = run_trial(small, mc, _cfg(), feature_cache=cache)
        second = run_trial(small, mc, _cfg(lr=1e-3), feature_cache=cache)
        plain = run_trial(small, mc, _cfg(feature_cache=False))
        assert first.feature_cache["used"] and not first.feature_cache["hit"]
        assert second.feature_cache["hit"]
        assert not plain.feature_cache["used"]
        a = first.summary["metrics"]
        b = plain.summary["metrics"]
        for key in ("accuracy", "auc"):
            assert a[key]["folds"] == pytest.approx(b[key]["folds"], abs=1e-6)
        la = [p["train_loss"] for c in first.curves for p in c]
        lb = [p["train_loss"] for c in plain.curves for p in c]
        assert la == pytest.approx(lb, rel=1e-4)
    assert cache.hits >= 2 and cache.misses == 2


def test_deeper_depths_start_from_the_shared_frozen_prefix(small) -> None:
    """With `share_from`, the first trial caches the shallow prefix's features on its way to
    its own depth, and a deeper trial starts from the deepest cached depth, not from pixels;
    results equal the uncached trial's."""
    n = num_stages("test_resnet")
    cache = FeatureCache()
    mid = _model(small, backbone="test_resnet", frozen_stages=n - 1)
    first = run_trial(small, mid, _cfg(), feature_cache=cache, share_from=n - 2)
    assert first.feature_cache["from_depth"] == n - 2 and cache.misses == 2
    shallow = run_trial(
        small,
        _model(small, backbone="test_resnet", frozen_stages=n - 2),
        _cfg(),
        feature_cache=cache,
    )
    assert shallow.feature_cache["hit"]  # cached on the way
    head_only = _model(small, backbone="test_resnet", frozen_stages=n, head_kwargs={"pool": "max"})
    deep = run_trial(small, head_only, _cfg(), feature_cache=cache, share_from=n - 2)
    assert deep.feature_cache["kind"] == "pooled" and deep.feature_cache["from_depth"] == n - 1
    assert cache.misses == 3
    for cached, mc in ((first, mid), (deep, head_only)):
        plain = run_trial(small, mc, _cfg(feature_cache=False))
        assert cached.summary["metrics"]["accuracy"]["folds"] == pytest.approx(
            plain.summary["metrics"]["accuracy"]["folds"], abs=1e-6
        )
        la = [p["train_loss"] for c in cached.curves for p in c]
        lb = [p["train_loss"] for c in plain.curves for p in c]
        assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_head_only_trials_train_the_classifier_on_pooled_vectors(small, pool: str) -> None:
    """Every stage frozen + a pooling head: the cache holds (N, 2, C) avg/max vectors (one
    entry serves all three pools), and the trial trains the classifier alone on them."""
    from automl_cxr.models import build_model

    n = num_stages("test_efficientnet")
    cache = FeatureCache()
    mc = _model(small, frozen_stages=n, head="mlp", head_kwargs={"pool": pool, "hidden": 8})
    res = run_trial(small, mc, _cfg(), feature_cache=cache)
    width = build_model(mc).num_features
    info = res.feature_cache
    assert info["kind"] == "pooled" and info["from_depth"] == 0
    assert info["bytes"] == len(small) * width * (2 if pool == "avgmax" else 1) * 4
    other = "avg" if pool != "avg" else "max"
    again = run_trial(
        small,
        _model(small, frozen_stages=n, head_kwargs={"pool": other}),
        _cfg(),
        feature_cache=cache,
    )
    assert again.feature_cache["hit"] and cache.misses == 1


def test_pooled_vectors_are_what_the_head_pools() -> None:
    from automl_cxr.models import POOLS, FeaturePool, combine_pooled, pool_vectors

    gen = torch.Generator().manual_seed(0)
    for x in (torch.randn(3, 5, 4, 2, generator=gen), torch.randn(3, 7, 5, generator=gen)):
        pair = torch.stack(pool_vectors(x), dim=1)  # (N, 2, C), as the feature cache keeps it
        for pool in POOLS:
            got = combine_pooled(pair, pool)
            assert torch.allclose(got, FeaturePool(pool)(x))
            assert got.untyped_storage().data_ptr() == pair.untyped_storage().data_ptr()  # a view


def test_latency_is_measured_once_per_architecture(small, monkeypatch) -> None:
    import automl_cxr.engine._latency as trial_mod

    calls = []
    real = trial_mod._latency_ms
    monkeypatch.setattr(trial_mod, "_LATENCY", {})
    monkeypatch.setattr(trial_mod, "_PROBE", {})
    monkeypatch.setattr(trial_mod, "_latency_ms", lambda *a, **k: calls.append(1) or real(*a, **k))
    n = num_stages("test_efficientnet")
    cfg = _cfg(epochs=1, max_folds=1)
    a = run_trial(small, _model(small, frozen_stages=n), cfg)
    assert len(calls) == 2  # the backbone's forward_features, then the head on its output
    b = run_trial(small, _model(small, frozen_stages=n - 1), cfg)  # depth does not change it
    assert len(calls) == 2 and a.latency_ms == b.latency_ms > 0
    mlp = {"hidden": 16, "dropout": 0.1}
    probe = trial_mod._PROBE.copy()
    c = run_trial(small, _model(small, frozen_stages=n, head="mlp", head_kwargs=mlp), cfg)
    assert len(calls) == 3  # another head is timed, the backbone is not (nor run again:
    assert trial_mod._PROBE.keys() == probe.keys()  # the head is timed on the kept feature map)
    assert all(trial_mod._PROBE[k] is v for k, v in probe.items())
    mlp["dropout"] = 0.4  # dropout does not change a forward pass
    d = run_trial(small, _model(small, frozen_stages=n, head="mlp", head_kwargs=mlp), cfg)
    assert len(calls) == 3 and d.latency_ms == c.latency_ms
    # three timings kept: the backbone, the linear head, the MLP head (whose sums with the
    # backbone may round to the same figure: a head takes hundredths of a millisecond)
    assert len(trial_mod._LATENCY) == 3
    # the sum of the parts is the whole model's single-image latency (same order of magnitude)
    model = build_model(_model(small, frozen_stages=n))
    x = torch.rand(1, 1, cfg.resolution, cfg.resolution)
    whole = real(model.eval(), x, torch.device("cpu"), contextlib.nullcontext)
    assert 0.2 * whole < a.latency_ms < 5 * whole


def test_augmentation_bypasses_cache(small) -> None:
    mc = _model(small, frozen_stages=num_stages("test_efficientnet"))
    res = run_trial(small, mc, _cfg(augment=0.5))
    assert not res.feature_cache["used"]


def test_external_set_evaluated_once_with_fold_ensemble(prepared_dir, small) -> None:
    ext = subsample(load_dataset("three_class", prepared_dir), 10, seed=5)
    res = run_trial(small, _model(small), _cfg(), external=ext)
    assert res.external["dataset"] == "three_class"
    assert res.external["metrics"]["n"] == len(ext)
    ci = res.external["bootstrap"]["metrics"]["accuracy"]
    assert ci["ci_low"] <= ci["estimate"] <= ci["ci_high"]


def test_config_validation_messages() -> None:
    with pytest.raises(ConfigError, match="epochs must be at least 1, but got epochs=0"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="holdout must be in"):
        TrainConfig(holdout=0.9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": "10"}, "epochs must be an integer, but got epochs='10'"),
        ({"batch_size": 2.5}, "batch_size must be an integer, but got batch_size=2.5"),
        ({"batch_size": True}, "batch_size must be an integer, but got batch_size=True"),
        ({"lr": -1}, "lr must be greater than 0, but got lr=-1"),
        ({"lr": "1e-3"}, "lr must be a number, but got lr='1e-3'"),
        ({"lr": float("nan")}, "lr must be a number, but got lr=nan"),
        ({"weight_decay": -0.1}, "weight_decay must be at least 0, but got weight_decay=-0.1"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\), but got momentum=1.5"),
        ({"augment": "strong"}, "augment must be a number, but got augment='strong'"),
        ({"early_stopping": 2.0}, "early_stopping must be an integer or None, but got"),
        ({"early_stopping": 0}, "early_stopping must be at least 1, but got early_stopping=0"),
        ({"class_weighting": 1}, "class_weighting must be true or false, but got"),
        ({"amp": "yes"}, "amp must be true or false, but got amp='yes'"),
        ({"n_folds": 5.0}, "n_folds must be an integer, but got n_folds=5.0"),
        ({"max_folds": 0}, "max_folds must be at least 1, but got max_folds=0"),
        ({"seed": -1}, "seed must be at least 0, but got seed=-1"),
        ({"cv": "image"}, "cv must be one of \\('patient', 'site'\\), but got cv='image'"),
        ({"inner_holdout": 0.9}, r"inner_holdout must be in \(0, 0.5\], but got"),
        ({"device": 0}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', but got 0"),
    ],
)
def test_train_config_checks_types_and_ranges(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_train_config_accepts_numpy_numbers_as_plain_python() -> None:
    cfg = TrainConfig(epochs=np.int64(3), lr=np.float32(0.5), batch_size=np.int32(8))
    assert type(cfg.epochs) is int and cfg.epochs == 3
    assert type(cfg.lr) is float and type(cfg.batch_size) is int
    assert TrainConfig(lr=1).lr == 1.0 and type(TrainConfig(lr=1).lr) is float


def test_feature_cache_bad_budget_is_a_project_error() -> None:
    from automl_cxr.errors import AutomlCxrError

    with pytest.raises(AutomlCxrError, match="max_bytes must be at least 0, but got"):
        FeatureCache(max_bytes=-1)


def test_fit_full_trains_on_every_image(small) -> None:
    from automl_cxr.engine import fit_full

    model = fit_full(small, _model(small), _cfg(epochs=1, batch_size=7))
    assert not model.training
    info = model.training_info
    # the rows that went through training batches are every row of the dataset
    assert info["n_trained_images"] == len(small)
    assert info["trained_hash"] == members_hash(row_identities(small))
    assert info["epochs"] == 1 and info["epochs_from"] == "config"
    # and that is not what a fold's training sees
    trial = run_trial(small, _model(small), _cfg(epochs=1, batch_size=7))
    assert all(r["trained_hash"] != info["trained_hash"] for r in trial.splits)
    x = torch.from_numpy(np.array(small.images(48))[:4]).unsqueeze(1).float() / 255
    probs = torch.softmax(model(x), dim=1)
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(1), torch.ones(4))


def test_metrics_stratified_by_source(small) -> None:
    res = run_trial(small, _model(small), _cfg(epochs=1))
    assert set(res.by_source) == {"cohen", "kermany"}
    assert res.by_source["cohen"]["n"] + res.by_source["kermany"]["n"] == len(small)
    # every Cohen image is covid in this recipe: its per-source confusion matrix has one row
    cm = np.array(res.by_source["cohen"]["confusion_matrix"])
    assert cm.sum() == cm[small.classes.index("covid")].sum()


@pytest.mark.parametrize("cached", [True, False])
def test_fit_folds_keeps_the_trials_fold_models(small, cached: bool) -> None:
    """Each kept fold model, applied to its own validation fold, gives exactly the metrics the
    trial recorded for that fold (also when training ran on cached frozen features)."""
    import torch

    from automl_cxr.engine import compute_metrics, fit_folds

    mc = _model(small, frozen_stages=num_stages("test_efficientnet") - 1)
    cfg = _cfg(feature_cache=cached)
    trial = run_trial(small, mc, cfg)
    models, folds = fit_folds(small, mc, cfg)
    assert len(models) == len(folds) == len(trial.folds) == 2
    assert trial.feature_cache["used"] is cached
    x = torch.from_numpy(np.array(small.images(48))).unsqueeze(1).float() / 255
    for model, sp, fold, recorded in zip(models, trial.splits, folds, trial.folds, strict=True):
        val = np.array(sp["val_indices"])
        assert not model.training and fold["n_val"] == len(val)
        with torch.no_grad():
            probs = torch.softmax(model(x[val]), dim=1).numpy()
        m = compute_metrics(small.labels[val], probs, small.classes)
        assert m["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-9)
        assert m["auc"] == pytest.approx(recorded["auc"], abs=1e-6)
        assert fold["balanced_accuracy"] == pytest.approx(recorded["balanced_accuracy"])
    w0, w1 = (list(m.head.parameters())[-1] for m in models)
    assert not torch.equal(w0, w1)  # two models, not one model twice


def test_mlp_batchnorm_head_trains_when_last_batch_has_one_image(small) -> None:
    """len(train) % batch_size == 1 used to crash BatchNorm1d in training mode."""
    from automl_cxr.engine import fit_full

    n_train = len(small) - len(
        make_splits(small.manifest["label"].to_numpy(), small.groups, n_folds=2, seed=0)[0].val
    )
    mc = _model(small, head="mlp", head_kwargs={"hidden": 8, "batchnorm": True})
    cfg = _cfg(batch_size=n_train - 1, epochs=1, max_folds=1)
    res = run_trial(small, mc, cfg)
    assert res.splits[0]["n_train"] % cfg.batch_size == 1
    assert np.isfinite(res.curves[0][0]["train_loss"])
    model = fit_full(small, mc, _cfg(batch_size=len(small) - 1, epochs=1))
    assert not model.training


def test_optimizer_keeps_batchnorm_and_bias_free_of_weight_decay(small) -> None:
    from automl_cxr.engine._optim import build_optimizer
    from automl_cxr.models import build_model

    model = build_model(
        _model(small, backbone="test_resnet", head="mlp", head_kwargs={"batchnorm": True})
    )
    for name in ("sgd", "adam", "adamw"):
        opt = build_optimizer(model, _cfg(optimizer=name, weight_decay=0.05))
        decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        for pname, p in model.named_parameters():
            is_norm_or_bias = p.ndim <= 1 or pname.endswith(".bias")
            assert decay_of[id(p)] == (0.0 if is_norm_or_bias else 0.05), pname
        bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bn and all(decay_of[id(m.weight)] == 0.0 for m in bn)
        assert decay_of[id(model.head.classifier[-1].bias)] == 0.0
    sgd = build_optimizer(model, _cfg(optimizer="sgd", momentum=0.8))
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.8


def test_frozen_parameters_are_not_optimised(small) -> None:
    from automl_cxr.engine._optim import build_optimizer
    from automl_cxr.models import build_model

    model = build_model(_model(small, frozen_stages=num_stages("test_efficientnet") - 1))
    opt = build_optimizer(model, _cfg())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # 4 epochs x 2 updates, 1 warmup epoch; lr after each update (lr=1)
        ("cosine", [0.75, 1.0, 0.933, 0.75, 0.5, 0.25, 0.067, 0.0]),
        ("none", [0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_timm_schedule_warmup_then_decay(schedule: str, expected: list[float]) -> None:
    from automl_cxr.engine._optim import build_optimizer, build_scheduler

    cfg = TrainConfig(epochs=4, lr=1.0, warmup_epochs=1, schedule=schedule)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # warmup starts at lr / 2 updates
    got = []
    for u in range(1, 9):
        sched.step_update(num_updates=u)
        got.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx(expected, abs=1e-3)


def test_step_schedule_divides_by_ten_twice() -> None:
    from automl_cxr.engine._optim import build_optimizer, build_scheduler

    cfg = TrainConfig(epochs=8, lr=1.0, schedule="step")
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, 1)
    got = []
    for u in range(1, 9):
        sched.step_update(num_updates=u)
        got.append(round(opt.param_groups[0]["lr"], 6))
    assert sorted(set(got), reverse=True) == [1.0, 0.1, 0.01]


@pytest.mark.parametrize("change", ["initial_state", "normalisation", "image_cache", "timm"])
def test_feature_cache_key_covers_every_determinant(
    small, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A change to anything that alters the frozen prefix's output must miss the cache: the
    prefix's initial state (same weight source and seed), mean/std, the image cache version,
    the timm version."""
    import timm

    import automl_cxr.data
    import automl_cxr.engine._session as trial_mod

    mc = _model(small, frozen_stages=num_stages("test_efficientnet"))
    cfg = _cfg(epochs=1, max_folds=1)
    cache = FeatureCache()
    first = run_trial(small, mc, cfg, feature_cache=cache)
    again = run_trial(small, mc, cfg, feature_cache=cache)
    assert not first.feature_cache["hit"] and again.feature_cache["hit"]
    assert first.feature_cache["key_parts"]["weights"].startswith("state:")

    build = trial_mod.build_model

    def perturbed(config):
        model = build(config)
        with torch.no_grad():
            if change == "initial_state":
                next(model.backbone.parameters()).mul_(1.5)
            else:
                model.input_norm.mean.add_(0.1)
        return model

    if change in ("initial_state", "normalisation"):
        monkeypatch.setattr(trial_mod, "build_model", perturbed)
    elif change == "image_cache":
        monkeypatch.setattr(automl_cxr.data, "CACHE_VERSION", automl_cxr.data.CACHE_VERSION + 1)
    else:
        monkeypatch.setattr(timm, "__version__", timm.__version__ + ".other")
    changed = run_trial(small, mc, cfg, feature_cache=cache)
    assert changed.weight_source == first.weight_source
    assert not changed.feature_cache["hit"]
    assert changed.feature_cache["key"] != first.feature_cache["key"]


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_chooses_on_an_inner_split_and_reports_the_outer_fold(small) -> None:
    """Early stopping watches an inner split of the training patients, never the fold it
    reports; the fold reports its outer metrics at the epoch with the best inner loss."""
    from automl_cxr.engine import fit_folds, fit_full

    cfg = _cfg(epochs=6, early_stopping=1, lr=3e-2)
    steps: list[tuple[int, float]] = []
    res = run_trial(small, _model(small), cfg, report=lambda s, v: steps.append((s, v)))
    ids = row_identities(small)
    for rec, fold, curve in zip(res.splits, res.folds, res.curves, strict=True):
        val = np.array(rec["val_indices"])
        inner = np.array(rec["inner_val_indices"])
        train = np.setdiff1d(np.arange(len(small)), val)
        fit_rows = np.setdiff1d(train, inner)
        # the inner split is carved from the training patients only, grouped by patient
        assert inner.size and np.isin(inner, train).all() and not np.isin(inner, val).any()
        assert not set(small.groups[inner]) & set(small.groups[fit_rows])
        assert 0.05 < inner.size / train.size < 0.35
        # the model trained on the rest only
        assert rec["trained_hash"] == members_hash(ids, fit_rows)
        # the chosen epoch is the best inner loss, and the fold reports the outer value there
        inner_losses = [p["inner_val_loss"] for p in curve]
        assert rec["best_epoch"] == int(np.argmin(inner_losses)) == fold["best_epoch"]
        assert fold["epochs_run"] == len(curve) == rec["epochs_run"] <= 6
        assert fold["balanced_accuracy"] == pytest.approx(curve[rec["best_epoch"]]["value"])
        # stopping: patience 1 after the best inner epoch (or all epochs)
        assert len(curve) in (rec["best_epoch"] + 2, 6)
    # the pruner still sees every epoch's outer fold value
    assert [v for _, v in steps] == [p["value"] for c in res.curves for p in c]
    chosen = [r["best_epoch"] + 1 for r in res.splits]
    assert res.full_fit_epochs == int(np.floor(np.median(chosen) + 0.5))
    # the fold models are those of the chosen epoch
    models, folds = fit_folds(small, _model(small), cfg)
    assert [f["balanced_accuracy"] for f in folds] == pytest.approx(
        [f["balanced_accuracy"] for f in res.folds]
    )
    # stop="cv_epochs": fit_full trains on everything for the epochs the CV chose
    full = fit_full(small, _model(small), cfg, stop="cv_epochs")
    assert full.training_info["epochs_from"] == "cv_early_stopping"
    assert full.training_info["fold_epochs"] == chosen
    assert full.training_info["epochs"] == res.full_fit_epochs
    assert full.training_info["n_trained_images"] == len(small)
    given = fit_full(small, _model(small), cfg, epochs=2)
    assert given.training_info == {**given.training_info, "epochs": 2, "epochs_from": "argument"}


def test_full_fit_stops_on_an_inner_split_as_each_fold_did(small) -> None:
    """The default stop: an inner split of all the patients stops the full fit and the model
    kept is the one of the epoch with the best inner loss; the inner patients are not trained
    on. An explicit epoch count still wins, and a bad `stop` is refused by name."""
    import torch.nn.functional as F

    from automl_cxr.engine import fit_full
    from automl_cxr.engine._folds import inner_split

    cfg = _cfg(epochs=6, early_stopping=1, lr=3e-2)
    model = fit_full(small, _model(small), cfg)
    info = model.training_info
    fit_rows, inner = inner_split(small, np.arange(len(small)), cfg, 0)
    assert info["epochs_from"] == "inner_early_stopping"
    assert info["inner_holdout_images"] == len(inner) and len(inner) > 0
    assert not set(small.groups[inner]) & set(small.groups[fit_rows])
    assert info["trained_hash"] == members_hash(row_identities(small), fit_rows)
    # stopped with patience 1 after its best epoch (or at the last), kept the best one
    assert info["epochs_run"] in (info["epochs"] + 1, cfg.epochs)
    x = torch.from_numpy(np.array(small.images(48))[inner]).unsqueeze(1).float() / 255
    with torch.no_grad():
        logp = torch.log(torch.softmax(model(x), dim=1).clamp_min(1e-12))  # as the session
    loss = float(F.nll_loss(logp, torch.as_tensor(small.labels[inner], dtype=torch.long)))
    assert loss == pytest.approx(info["inner_val_loss"], rel=1e-4, abs=1e-5)
    assert fit_full(small, _model(small), cfg, epochs=2).training_info["epochs_from"] == "argument"
    with pytest.raises(ConfigError, match="stop must be one of .*'cv_epochs', 'inner'.*'halt'"):
        fit_full(small, _model(small), cfg, stop="halt")
    # too few patients to stop on: the error names whose split it is, and the class plainly
    labels = np.asarray(small.labels)
    two = np.r_[np.flatnonzero(labels == 0)[:1], np.flatnonzero(labels == 1)[:1]]
    for fold, whose in ((None, "the retrained model's"), (2, "fold 2's")):
        with pytest.raises(ConfigError, match=f"split of {whose} training patients.*class '"):
            inner_split(small, two, cfg, fold)


def test_without_early_stopping_full_fit_uses_the_configured_epochs(small) -> None:
    res = run_trial(small, _model(small), _cfg(epochs=2))
    assert res.full_fit_epochs == 2
    assert all("inner_val_loss" not in p for c in res.curves for p in c)


# ----------------------------------------------------------------------------- site-held-out


@pytest.fixture(scope="module")
def cohen_sites(tmp_path_factory, shared_data):
    """Cohen's frontal X-rays as covid / other (findings that may be COVID-19 left out), with
    the manifest's `site` (the metadata's normalised `location`), 40 images per class by
    patient."""
    import dataclasses

    from automl_cxr.data import prepare_table, read_cohen

    out = tmp_path_factory.mktemp("cohen-sites")
    src = read_cohen(shared_data / "cohen")
    t = src.table[src.table["label"] != "uncertain"]
    t = t.assign(label=np.where(t["label"] == "covid", "covid", "other"))
    prepare_table(
        dataclasses.replace(src, table=t),
        name="cohen_sites",
        data_dir=out,
        kind="csv",
        origin="test",
    )
    ds = load_dataset("cohen_sites", out)
    assert ds.manifest["site"].str.startswith("cohen:").all()
    return subsample(ds, 40, seed=0)


def test_site_cv_trial_holds_out_sites_on_the_folds_it_used(cohen_sites) -> None:
    ds = cohen_sites
    res = run_trial(ds, _model(ds, num_classes=2), _cfg(cv="site", epochs=1))
    sites = ds.manifest["site"].replace("", "cohen:unknown").to_numpy()
    val = np.concatenate([np.array(r["val_indices"]) for r in res.splits])
    assert np.array_equal(np.sort(val), np.arange(len(ds)))
    for r in res.splits:
        v = np.array(r["val_indices"])
        tr = np.setdiff1d(np.arange(len(ds)), v)
        assert not set(sites[tr]) & set(sites[v]), "a site in both train and val"
        assert not set(ds.groups[tr]) & set(ds.groups[v]), "a patient in both train and val"
        assert r["cv"] == "site" and r["val_sites"] == sorted(set(sites[v]))
    assert res.train_config["cv"] == "site"
    patient = run_trial(ds, _model(ds, num_classes=2), _cfg(epochs=1))
    assert [r["val_hash"] for r in patient.splits] != [r["val_hash"] for r in res.splits]


def test_site_cv_falls_back_with_a_warning_in_the_result(cohen_sites) -> None:
    ds = cohen_sites
    k = int(pd_nunique_sites(ds))
    res = run_trial(ds, _model(ds, num_classes=2), _cfg(cv="site", epochs=1, n_folds=k + 3))
    assert res.warnings and "not feasible" in res.warnings[0]
    assert len(res.splits) < k + 3


def pd_nunique_sites(ds) -> int:
    from automl_cxr.data import site_groups

    sites = ds.manifest["site"].replace("", "cohen:unknown").to_numpy()
    return min(np.unique(site_groups(ds.groups, sites)[ds.labels == c]).size for c in (0, 1))


def test_site_cv_refuses_a_recipe_whose_classes_come_from_one_site(small) -> None:
    small.manifest["site"] = np.where(small.manifest["source"] == "kermany", "kermany", "x")
    try:
        with pytest.raises(ConfigError, match="site-held-out validation is not possible"):
            run_trial(small, _model(small), _cfg(cv="site"))
    finally:
        del small.manifest["site"]
    with pytest.raises(ConfigError, match="cv='site' needs a 'site' column"):
        run_trial(small, _model(small), _cfg(cv="site"))


# ----------------------------------------------------------------------------- external sets


def test_several_external_sets_and_a_subset_of_the_classes(prepared_dir, small) -> None:
    full = load_dataset("three_class", prepared_dir)
    ext1 = subsample(full, 8, seed=5)
    pick = np.flatnonzero(ext1.manifest["label"].isin(["covid", "normal"]).to_numpy())
    ext2 = ext1.subset(pick, tag="covid-normal")
    ext2.meta["labels"], ext2.meta["name"] = ["covid", "normal"], "two_class_ext"
    res = run_trial(small, _model(small), _cfg(epochs=1), externals=[ext1, ext2])
    assert set(res.externals) == {"three_class", "two_class_ext"} and res.external is None
    e1, e2 = res.externals["three_class"], res.externals["two_class_ext"]
    assert e1["n"] == e1["metrics"]["n"] == len(ext1) and e2["n"] == len(ext2)
    assert e2["classes"] == ["covid", "normal"] and e2["dataset_hash"] == ext2.hash
    # the two-class set is scored in the study's classes: its rows are the same images as
    # ext1's covid/normal rows, and get the same predictions, so their counts agree
    cm1, cm2 = (
        np.array(e1["metrics"]["confusion_matrix"]),
        np.array(e2["metrics"]["confusion_matrix"]),
    )
    assert cm2.shape == (3, 3)
    for c in ("covid", "normal"):
        k = small.classes.index(c)
        assert (cm2[k] == cm1[k]).all()
    assert cm2[small.classes.index("bacterial")].sum() == 0
    for e in (e1, e2):
        ci = e["bootstrap"]["metrics"]["accuracy"]
        assert ci["ci_low"] <= ci["estimate"] <= ci["ci_high"]
    bad = ext1.subset(np.arange(4), tag="bad")
    bad.meta["labels"] = ["covid", "tuberculosis"]
    with pytest.raises(DataError, match="'tuberculosis'\\] are not among the study's"):
        run_trial(small, _model(small), _cfg(epochs=1), externals=[bad])


def test_caches_sharing_a_folder_compute_each_entry_once(tmp_path) -> None:
    """Two caches (as in two worker processes) on one folder: while one computes an entry,
    the other waits on the entry's lock and then loads it instead of computing it again."""
    import threading
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.5)
        return torch.arange(6.0)

    caches = [FeatureCache(directory=tmp_path), FeatureCache(directory=tmp_path)]
    got = [None, None]

    def work(i):
        got[i] = caches[i].get_or_compute("k", slow)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(hit for _, hit in got) == [False, True]
    assert all(torch.equal(t, torch.arange(6.0)) for t, _ in got)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_feature_cache_entries_on_disk_are_memory_mapped(tmp_path) -> None:
    """An entry written to or read from the folder is a mapping of its file (shared by the
    worker processes through the page cache, issue 26), not a private copy; its values are
    the computed ones."""
    computed = torch.arange(24.0).reshape(4, 2, 3)
    t, hit = FeatureCache(directory=tmp_path).get_or_compute("k", lambda: computed.clone())
    assert not hit and torch.equal(t, computed)
    u = FeatureCache(directory=tmp_path).get("k")
    assert u is not None and torch.equal(u, computed)
    mapped = Path("/proc/self/maps").read_text()
    assert str(tmp_path / "k.npy") in mapped
    memory_only, _ = FeatureCache().get_or_compute("m", lambda: computed.clone())
    assert torch.equal(memory_only, computed)  # without a folder nothing changes


def test_feature_cache_entries_are_written_batch_by_batch(tmp_path) -> None:
    """Given row batches, an entry goes to its file as the batches come (the earlier batches
    are on disk before the last is computed: never whole in memory, issue 26), and reads back
    mapped with every row; without a folder the batches are gathered; a wrong row count or
    batches without `rows` are refused."""
    full = torch.arange(10 * 1024 * 4, dtype=torch.float32).reshape(10, 1024, 4)  # 16 KB rows
    on_disk: list[int] = []

    def batches():
        for i in range(0, 10, 4):
            if i == 8:  # the last batch: what was written so far
                on_disk.append(sum(f.stat().st_size for f in tmp_path.glob("*.tmp")))
            yield full[i : i + 4]

    t, hit = FeatureCache(directory=tmp_path).get_or_compute("s", batches, rows=10)
    assert not hit and torch.equal(t, full)
    header = (tmp_path / "s.npy").stat().st_size - full.numel() * 4
    assert on_disk == [header + 8 * full[0].numel() * 4]  # two batches of four rows
    assert str(tmp_path / "s.npy") in Path("/proc/self/maps").read_text()
    assert not list(tmp_path.glob("*.tmp"))
    u, hit = FeatureCache(directory=tmp_path).get_or_compute("s", batches, rows=10)
    assert hit and torch.equal(u, full)
    mem, _ = FeatureCache().get_or_compute("s", batches, rows=10)
    assert torch.equal(mem, full)
    with pytest.raises(ConfigError, match="rows must be given"):
        FeatureCache().get_or_compute("x", batches)
    with pytest.raises(RuntimeError, match="10 of 12 rows"):
        FeatureCache().get_or_compute("y", batches, rows=12)
    with pytest.raises(ValueError, match="10 rows"):
        FeatureCache(directory=tmp_path).get_or_compute("z", batches, rows=12)
    assert not (tmp_path / "z.npy").exists() and not list(tmp_path.glob("*.tmp"))


def test_inference_batches_are_small_on_a_cpu_and_predict_gathers_rows_per_batch(small) -> None:
    """Inference-only passes run 16 images a batch on a CPU (faster and 0.5-0.7 GB lighter
    on one thread than 128, benchmarks/eval_batch.json), 128 on CUDA, or what is asked for; and a
    fold's rows are gathered one batch at a time, with the same probabilities."""
    from automl_cxr.engine._session import _predict

    assert TrainConfig().eval_batch("cpu") == 16 and TrainConfig().eval_batch("cuda") == 128
    assert TrainConfig(eval_batch_size=64).eval_batch("cpu") == 64
    with pytest.raises(ConfigError, match="eval_batch_size"):
        TrainConfig(eval_batch_size=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.randn(40, 12)
    rows = torch.tensor([5, 1, 33, 7, 20, 21, 2, 39, 0])
    prep = lambda xb, train: xb  # noqa: E731
    whole = _predict(net, x[rows], prep, 128, contextlib.nullcontext)
    per_batch = _predict(net, x, prep, 4, contextlib.nullcontext, rows)
    assert per_batch.shape == (9, 3) and np.allclose(whole, per_batch, atol=1e-6)


def test_cpu_amp_runs_in_bfloat16_only_where_the_cpu_computes_it(small) -> None:
    """`cpu_amp` trains and evaluates under bfloat16 autocast on a CPU with native bf16
    (this machine's AVX512-BF16) and records it; the cached frozen features stay float32 and
    are shared with float32 trials."""
    from automl_cxr.engine import cpu_bf16_supported

    cache = FeatureCache()
    mc = _model(small, frozen_stages=num_stages("test_efficientnet") - 1)
    fp32 = run_trial(small, mc, _cfg(max_folds=1), feature_cache=cache)
    bf16 = run_trial(small, mc, _cfg(max_folds=1, cpu_amp=True), feature_cache=cache)
    assert fp32.precision == "fp32"
    assert bf16.precision == ("bf16" if cpu_bf16_supported() else "fp32")
    assert bf16.train_config["cpu_amp"] is True
    assert bf16.feature_cache["key"] == fp32.feature_cache["key"] and bf16.feature_cache["hit"]
    assert cache.get(bf16.feature_cache["key"]).dtype == torch.float32
    probs = bf16.oof_probs[~np.isnan(bf16.oof_probs).any(axis=1)]
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and 0 <= bf16.value <= 1
    if cpu_bf16_supported():  # bf16 arithmetic, not the same numbers
        assert not np.array_equal(probs, fp32.oof_probs[~np.isnan(fp32.oof_probs).any(axis=1)])
    # the same seed gives the same bf16 trial
    again = run_trial(small, mc, _cfg(max_folds=1, cpu_amp=True), feature_cache=cache)
    assert again.value == bf16.value
    assert np.array_equal(again.oof_probs, bf16.oof_probs, equal_nan=True)


def _mapping_of(ptr: int) -> str | None:
    """The file mapped at address `ptr` in this process (Linux /proc/self/maps), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_session_maps_the_image_cache_and_lets_it_go_behind_cached_features(
    prepared_dir,
) -> None:
    """A trial reads the image cache through a copy-on-write mapping of its file (the workers
    of a search share one copy), and drops it once it trains on cached frozen features."""
    from automl_cxr.engine._session import Session

    ds = load_dataset("three_class", prepared_dir)
    pixels = Session(ds, _model(ds), _cfg(), feature_cache=None, log=None)
    mapped = _mapping_of(pixels.images.data_ptr())
    assert mapped is not None and Path(mapped).resolve() == ds.cache_path(48).resolve()
    np.testing.assert_array_equal(pixels.images[:, 0].numpy(), ds.images(48))
    n = num_stages("test_efficientnet")
    frozen = Session(ds, _model(ds, frozen_stages=n), _cfg(), feature_cache=None, log=None)
    assert frozen.cache_info["used"] and frozen.images is None
