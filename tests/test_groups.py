"""The `group_dro` lever (online group DRO over (source, class) groups) on real adult films."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automl_cxr.engine import TrainConfig, run_trial
from automl_cxr.engine._groups import GroupDRO, source_class_groups
from automl_cxr.errors import ConfigError
from automl_cxr.models import ModelConfig
from automl_cxr.study import builtin_space


def _cfg(**kw) -> TrainConfig:
    base = dict(resolution=48, epochs=2, batch_size=16, n_folds=2, lr=3e-3, seed=0)
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


def test_group_weights_follow_the_worst_group() -> None:
    groups, names = source_class_groups(
        np.array(["covid", "non_covid", "non_covid", "covid"]),
        np.array(["cohen", "cohen", "nih", "cohen"]),
    )
    assert names == ["cohen/covid", "cohen/non_covid", "nih/non_covid"]
    assert groups.tolist() == [0, 1, 2, 0]
    dro = GroupDRO(groups, names, eta=0.5, device="cpu")
    per = torch.tensor([0.2, 2.0, 0.1, 0.4], requires_grad=True)
    loss = dro.loss(per, torch.arange(4))
    # one step: q_g ∝ exp(eta * mean loss of g); the loss is the q-weighted mean of group means
    means = torch.tensor([0.3, 2.0, 0.1])
    q = torch.exp(0.5 * means) / torch.exp(0.5 * means).sum()
    assert torch.allclose(dro.q, q) and loss.item() == pytest.approx(float((q * means).sum()))
    loss.backward()  # the gradient reaches each row through its group's weight
    assert per.grad[1] == pytest.approx(float(q[1]))
    assert per.grad[0] == pytest.approx(float(q[0]) / 2)
    for _ in range(20):  # the hard group keeps gaining weight
        dro.loss(per.detach(), torch.arange(4))
    assert dro.q.argmax().item() == 1 and dro.q[1] > 0.99
    before = dro.q.clone()  # a batch without group 1: its weight stays, it adds nothing
    out = dro.loss(torch.tensor([5.0, 0.0]), torch.tensor([0, 2]))
    assert out.item() == pytest.approx(
        float((before[0] * np.exp(2.5) * 5.0) / (before[0] * np.exp(2.5) + before[2]))
    )
    assert set(dro.record()) == set(names)
    huge = dro.loss(torch.tensor([5e3, 1e4, 2e3]), torch.arange(3))  # a diverging batch
    assert torch.isfinite(huge) and torch.isfinite(dro.q).all()
    assert dro.q.sum().item() == pytest.approx(1) and dro.q[1] == 1  # group 1 dominates
    # a batch of the groups whose weights underflowed to 0 beside group 1: still a number,
    # their renormalised weighted mean
    small = dro.loss(torch.tensor([1.0, 3.0]), torch.tensor([0, 2]))
    assert torch.isfinite(small) and 1.0 <= small.item() <= 3.0
    with pytest.raises(ValueError, match="eta must be positive, but got eta=0"):
        GroupDRO(groups, names, eta=0, device="cpu")


def test_generalisation_adjustment_favours_the_small_group() -> None:
    # group 0: 9 rows, group 1: 1 row, the same loss: without the adjustment the weights stay
    # equal; with C the small group's loss counts C/1 - C/3 more at every step
    groups, names = np.array([0] * 9 + [1]), ["big", "small"]
    per, rows = torch.full((10,), 0.5), torch.arange(10)
    plain = GroupDRO(groups, names, eta=0.5, device="cpu")
    adjusted = GroupDRO(groups, names, eta=0.5, device="cpu", adjust=1.0)
    for _ in range(3):
        plain.loss(per, rows)
        adjusted.loss(per, rows)
    assert torch.allclose(plain.q, torch.tensor([0.5, 0.5]))
    ratio = adjusted.q[1] / adjusted.q[0]
    assert ratio.item() == pytest.approx(np.exp(3 * 0.5 * (1 - 1 / 3)), rel=1e-5)
    with pytest.raises(ValueError, match="adjust must be at least 0, but got adjust=-1"):
        GroupDRO(groups, names, eta=0.5, device="cpu", adjust=-1)


def test_group_dro_zero_changes_nothing_and_nonzero_trains_for_the_worst_group(
    adult_small,
) -> None:
    ds = adult_small
    plain = run_trial(ds, _model(ds), _cfg())
    zero = run_trial(ds, _model(ds), _cfg(group_dro=0.0))
    assert np.array_equal(plain.oof_probs, zero.oof_probs, equal_nan=True)
    assert all("group_weights" not in f for f in zero.splits)
    dro = run_trial(ds, _model(ds), _cfg(group_dro=1.0))
    assert not np.allclose(plain.oof_probs, dro.oof_probs, equal_nan=True)
    again = run_trial(ds, _model(ds), _cfg(group_dro=1.0))
    assert np.array_equal(dro.oof_probs, again.oof_probs, equal_nan=True)  # seeded
    src = ds.manifest["source"].to_numpy()
    for fold in dro.splits:  # the (source, class) groups of the rows the fold trained on
        held = fold["val_indices"] + (fold["inner_val_indices"] or [])
        fit = np.setdiff1d(np.arange(len(ds)), held)
        trained = {f"{src[i]}/{ds.classes[ds.labels[i]]}" for i in fit}
        w = fold["group_weights"]
        assert set(w) == trained and sum(w.values()) == pytest.approx(1, abs=1e-4)
        assert max(w.values()) > 1 / len(w)  # the weights moved off uniform
    # beside group DRO, source_balance and class weighting change nothing
    both = run_trial(ds, _model(ds), _cfg(group_dro=1.0, source_balance=True))
    assert np.array_equal(dro.oof_probs, both.oof_probs, equal_nan=True)


def test_group_dro_is_validated_and_searched_in_the_robust_space() -> None:
    with pytest.raises(ConfigError, match="group_dro"):
        TrainConfig(group_dro=-0.1)
    with pytest.raises(ConfigError, match="group_dro"):
        TrainConfig(group_dro=11)
    with pytest.raises(ConfigError, match="group_dro_adjust"):
        TrainConfig(group_dro=0.3, group_dro_adjust=-1)
    params = builtin_space("robust").params(("mobilenetv2_100",))
    assert 0.0 in params["group_dro"].choices and len(params["group_dro"].choices) > 1
