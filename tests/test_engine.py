"""Trial engine on real shared X-rays with tiny timm test models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automl_cxr.data import load_dataset
from automl_cxr.engine import FeatureCache, TrainConfig, make_splits, run_trial
from automl_cxr.errors import ConfigError, TrialFailed
from automl_cxr.models import ModelConfig, num_stages
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
    # every image evaluated exactly once, out of fold, and no patient on both sides
    assert sum(s["n_val"] for s in res.splits) == len(small)
    splits = make_splits(small.manifest["label"].to_numpy(), small.groups, n_folds=2, seed=0)
    for sp in splits:
        assert not set(small.groups[sp.train]) & set(small.groups[sp.val])
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
    assert a.curves == b.curves


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
    import torch

    from automl_cxr.engine import fit_full

    model = fit_full(small, _model(small), _cfg(epochs=1))
    assert not model.training
    x = torch.from_numpy(np.asarray(small.images(48))[:4]).unsqueeze(1).float() / 255
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
    splits = make_splits(small.manifest["label"].to_numpy(), small.groups, n_folds=2, seed=0)
    x = torch.from_numpy(np.array(small.images(48))).unsqueeze(1).float() / 255
    for model, sp, fold, recorded in zip(models, splits, folds, trial.folds, strict=True):
        assert not model.training and fold["n_val"] == len(sp.val)
        with torch.no_grad():
            probs = torch.softmax(model(x[sp.val]), dim=1).numpy()
        m = compute_metrics(small.labels[sp.val], probs, small.classes)
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
    from automl_cxr.engine._trial import _optimizer
    from automl_cxr.models import build_model

    model = build_model(
        _model(small, backbone="test_resnet", head="mlp", head_kwargs={"batchnorm": True})
    )
    for name in ("sgd", "adam", "adamw"):
        opt = _optimizer(model, _cfg(optimizer=name, weight_decay=0.05))
        decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        for pname, p in model.named_parameters():
            is_norm_or_bias = p.ndim <= 1 or pname.endswith(".bias")
            assert decay_of[id(p)] == (0.0 if is_norm_or_bias else 0.05), pname
        bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bn and all(decay_of[id(m.weight)] == 0.0 for m in bn)
        assert decay_of[id(model.head.classifier[-1].bias)] == 0.0
    sgd = _optimizer(model, _cfg(optimizer="sgd", momentum=0.8))
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.8


def test_frozen_parameters_are_not_optimised(small) -> None:
    from automl_cxr.engine._trial import _optimizer
    from automl_cxr.models import build_model

    model = build_model(_model(small, frozen_stages=num_stages("test_efficientnet") - 1))
    opt = _optimizer(model, _cfg())
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
    from automl_cxr.engine._trial import _optimizer, _scheduler

    cfg = TrainConfig(epochs=4, lr=1.0, warmup_epochs=1, schedule=schedule)
    opt = _optimizer(torch.nn.Linear(2, 2), cfg)
    sched = _scheduler(opt, cfg, 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # warmup starts at lr / 2 updates
    got = []
    for u in range(1, 9):
        sched.step_update(num_updates=u)
        got.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx(expected, abs=1e-3)


def test_step_schedule_divides_by_ten_twice() -> None:
    from automl_cxr.engine._trial import _optimizer, _scheduler

    cfg = TrainConfig(epochs=8, lr=1.0, schedule="step")
    opt = _optimizer(torch.nn.Linear(2, 2), cfg)
    sched = _scheduler(opt, cfg, 1)
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
    import automl_cxr.engine._trial as trial_mod

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
