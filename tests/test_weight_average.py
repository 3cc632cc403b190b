"""The `weight_average` option: an exponential moving average of the trained weights, evaluated,
early-stopped on and kept in place of the weights as trained (0 = off)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from automl_cxr.engine import TrainConfig, run_trial
from automl_cxr.engine._optim import WeightAverage
from automl_cxr.errors import ConfigError
from automl_cxr.models import ModelConfig
from automl_cxr.study import load_space


def _cfg(**kw) -> TrainConfig:
    base = dict(resolution=48, epochs=3, batch_size=16, n_folds=2, lr=3e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _model(ds) -> ModelConfig:
    return ModelConfig(
        backbone="test_efficientnet",
        num_classes=len(ds.classes),
        pretrained=False,
        frozen_stages=4,
        head="linear",
    )


def test_the_average_follows_the_warmed_up_decay_and_copies_integer_buffers() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(net, 0.9)
    start = net[0].weight.detach().clone()
    expected = start.clone()
    for t in range(30):
        with torch.no_grad():
            net[0].weight.add_(1.0)
            net[1].num_batches_tracked += 1
        avg.update(net)
        d = min(0.9, (1 + t) / (10 + t))  # TensorFlow's ExponentialMovingAverage warm-up
        expected = d * expected + (1 - d) * net[0].weight.detach()
    assert torch.allclose(avg.avg["0.weight"], expected, atol=1e-5)
    assert avg.avg["1.num_batches_tracked"].item() == 30  # copied, not averaged
    trained = net[0].weight.detach().clone()
    with avg.swapped(net):  # the average in place for evaluation, the trained weights after
        assert torch.allclose(net[0].weight, expected, atol=1e-5)
    assert torch.equal(net[0].weight, trained)
    # the average lags the trained weights (they grew by 1 per update)
    assert (trained - expected).min() > 1


def test_only_what_training_can_change_is_averaged() -> None:
    """A frozen layer and an eval-mode BatchNorm are not visited on every update; a
    training-mode BatchNorm's statistics are, even with its affine weights frozen."""
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    net[0].requires_grad_(False)
    net[2].requires_grad_(False)
    net.train()
    net[1].eval()  # as CxrModel keeps its frozen stages
    avg = WeightAverage(net, 0.9)
    net(torch.randn(8, 3))  # net[2]'s running statistics move
    avg.update(net)
    assert set(avg.moving) == {
        "1.weight",
        "1.bias",
        "2.running_mean",
        "2.running_var",
        "2.num_batches_tracked",
        "3.weight",
        "3.bias",
    }
    assert avg.avg["2.num_batches_tracked"].item() == 1
    assert torch.equal(avg.avg["0.weight"], net[0].weight)  # the frozen copy, unchanged
    assert set(avg.state()) == set(net.state_dict())  # the whole state is kept


def test_weight_average_keeps_the_average_it_early_stopped_on(adult_small) -> None:
    ds = adult_small
    plain = run_trial(ds, _model(ds), _cfg(early_stopping=2))
    zero = run_trial(ds, _model(ds), _cfg(early_stopping=2, weight_average=0.0))
    assert np.array_equal(plain.oof_probs, zero.oof_probs, equal_nan=True)  # 0 = off
    avg = run_trial(ds, _model(ds), _cfg(early_stopping=2, weight_average=0.9))
    assert not np.allclose(plain.oof_probs, avg.oof_probs, equal_nan=True)
    again = run_trial(ds, _model(ds), _cfg(early_stopping=2, weight_average=0.9))
    assert np.array_equal(avg.oof_probs, again.oof_probs, equal_nan=True)  # seeded


def test_the_kept_model_is_the_evaluated_average(adult_small) -> None:
    from automl_cxr.engine._session import Session

    ds = adult_small
    cfg = _cfg(early_stopping=2, weight_average=0.9)
    session = Session(ds, _model(ds), cfg, feature_cache=None, log=None)
    idx = np.arange(len(ds))
    train, val = idx[: len(ds) // 2], idx[len(ds) // 2 :]
    fit = session.fit(train, val)
    # the model left in place predicts the validation rows exactly as the chosen epoch's
    # average did (not as the weights trained last)
    again, _ = session._evaluate(session.net, session.x_source, session.prep, val)
    assert np.allclose(fit.probs, again, atol=1e-6)


def test_weight_average_is_validated_and_searchable(tmp_path) -> None:
    with pytest.raises(ConfigError, match="weight_average"):
        TrainConfig(weight_average=1.0)
    with pytest.raises(ConfigError, match="weight_average"):
        TrainConfig(weight_average=-0.5)
    path = tmp_path / "space.yaml"
    path.write_text("backbones: [mobilenetv2_100]\nweight_average: [0, 0.9]\n")
    param = load_space(path).params(("mobilenetv2_100",))["weight_average"]
    assert param.kind == "categorical" and param.choices == (0, 0.9)
