"""build_model for the catalogue, frozen-depth semantics, split_frozen, gray modes (random init)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automl_cxr.errors import ConfigError
from automl_cxr.models import (
    CxrModel,
    ModelConfig,
    arch_info,
    build_model,
    get_backbone,
    list_backbones,
    num_stages,
)

pytestmark = pytest.mark.usefixtures("offline_weights")


# The default run builds the paper's MobileNetV2, EfficientNet-Lite0 and the tiny test models;
# the rest of the catalogue (seconds each on a 2-core machine) runs with `-m slow`.
FAST = {
    "mobilenetv2_100",
    "tf_efficientnet_lite0",
    "test_efficientnet",
    "test_resnet",
    "test_convnext",
    "test_vit",
}


def _size(name: str) -> int:
    spec = get_backbone(name)
    if name == "test_vit":
        return 160  # fixed input size
    return 96 if spec.input_size >= 299 else 64


def _build(name: str, n: int = 0, **kw) -> CxrModel:
    torch.manual_seed(0)
    return build_model(ModelConfig(name, num_classes=3, frozen_stages=n, pretrained=False, **kw))


def _gray(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = _size(name)
    return torch.rand(batch, 1, s, s, generator=g)


@pytest.mark.parametrize(
    "name",
    [
        s.name if s.name in FAST else pytest.param(s.name, marks=pytest.mark.slow)
        for s in list_backbones()
    ],
)
def test_build_every_catalogue_entry(name: str):
    model = _build(name)
    info = arch_info(get_backbone(name).arch)
    assert model.weight_source.kind == "random"
    assert model.num_features == info.num_features and model.num_stages == info.num_stages
    model.eval()
    with torch.no_grad():
        out = model(_gray(name))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    total, trainable = model.param_counts()
    head = sum(p.numel() for p in model.head.parameters())
    assert total == trainable == info.num_params + head  # unused timm head parts are gone
    frozen = _build(name, model.num_stages)
    assert frozen.param_counts() == (total, head)  # N = max: only the head trains


def test_forward_takes_gray_images_only():
    model = _build("test_resnet").eval()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(2, 3, 64, 64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": 3}, "backbone must be a name \\(str\\), but got backbone=3"),
        ({"num_classes": 2.0}, "num_classes must be an integer, but got num_classes=2.0"),
        ({"num_classes": True}, "num_classes must be an integer, but got num_classes=True"),
        ({"frozen_stages": "1"}, "frozen_stages must be an integer, but got frozen_stages='1'"),
        ({"head": None}, "head must be a name \\(str\\), but got head=None"),
        ({"head_kwargs": [1]}, "head_kwargs must be a mapping, but got head_kwargs=\\[1\\]"),
        ({"head_kwargs": {"dropout": 1.5}}, "dropout must be in \\[0, 1\\), but got dropout=1.5"),
        ({"head": "mlp", "head_kwargs": {"hidden": 2.5}}, "hidden must be an integer of at least"),
        ({"pretrained": "no"}, "pretrained must be true or false, but got pretrained='no'"),
        ({"weights_file": 5}, "weights_file must be a path or None, but got weights_file=5"),
        ({"gray_mode": "rgb"}, "gray_mode must be one of replicate, sum, but got gray_mode='rgb'"),
        ({"drop_path_rate": -0.1}, "drop_path_rate must be in \\[0, 1\\), but got"),
    ],
)
def test_model_config_checks_types_and_ranges(kwargs: dict, message: str):
    base = {"backbone": "test_resnet", "num_classes": 3, "pretrained": False}
    if "weights_file" in kwargs:
        base["pretrained"] = True
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**base, **kwargs})


def test_head_pooling_error_is_a_project_error():
    from automl_cxr.models import FeaturePool

    with pytest.raises(ConfigError, match="cannot pool features of shape"):
        FeaturePool("avgmax")(torch.zeros(2, 5))


def test_frozen_stages_out_of_range_names_backbone_and_range():
    with pytest.raises(ConfigError) as exc:
        ModelConfig("mobilenetv2_100", 3, frozen_stages=12, pretrained=False)
    assert str(exc.value) == (
        "frozen_stages must be between 0 and 8 for mobilenetv2_100, but got frozen_stages=12"
    )


def test_drop_path_rate_is_passed_on_or_refused():
    model = _build("test_efficientnet", drop_path_rate=0.1)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0
    with pytest.raises(ConfigError, match="drop_path_rate is not supported by backbone dense"):
        build_model(ModelConfig("densenet121", 2, pretrained=False, drop_path_rate=0.1))


# -- frozen depth ---------------------------------------------------------------------------------


# One of each family in the default run; the paper's other families with `-m slow`.
FAMILIES = ["test_efficientnet", "test_resnet", "test_convnext", "mobilenetv2_100"] + [
    pytest.param(n, marks=pytest.mark.slow)
    for n in (
        "tf_efficientnet_lite0",
        "mobilenetv3_large_100",
        "resnet18",
        "densenet121",
        "inception_v3",
        "legacy_xception",
        "vgg19",
    )
]


def _bn_stats(model: CxrModel) -> dict[str, torch.Tensor]:
    return {
        n: m.running_mean.clone()
        for n, m in model.backbone.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("name", FAMILIES)
def test_frozen_depth_semantics(name: str):
    info = arch_info(get_backbone(name).arch)
    total = info.num_stages
    for n in sorted({1, total // 2, total - 1, total}):
        model = _build(name, n)
        assert model.frozen_stages == n
        for pname, p in model.backbone.named_parameters():
            assert p.requires_grad == (info.stage_of[pname] >= n), (n, pname)
        assert all(p.requires_grad for p in model.head.parameters())
        # frozen modules stay in eval mode under train(); the rest trains
        model.train()
        for mname, m in model.backbone.named_modules():
            tensors = [t for t, _ in m.named_parameters(prefix=mname)]
            if tensors and all(info.stage_of[t] < n for t in tensors):
                assert not m.training, (n, mname)
            elif tensors and all(info.stage_of[t] >= n for t in tensors):
                assert m.training, (n, mname)
        # BatchNorm statistics of frozen stages do not move after a training step
        before = _bn_stats(model)
        weights = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        _train_step(model, _gray(name, batch=4))
        after = _bn_stats(model)
        for bn, stats in before.items():
            frozen = info.stage_of[f"{bn}.running_mean"] < n
            assert torch.equal(stats, after[bn]) == frozen, (n, bn)
        for key, value in model.backbone.state_dict().items():
            if key in info.stage_of and info.stage_of[key] < n:
                assert torch.equal(value, weights[key]), (n, key)


def test_full_depth_trains_only_the_head():
    model = _build("test_efficientnet", num_stages("test_efficientnet"))
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _train_step(model, _gray("test_efficientnet", batch=4))
    assert all(torch.equal(v, state[k]) for k, v in model.backbone.state_dict().items())
    assert not model.backbone.training and model.head.training
    assert model.eval().train().backbone.training is False


# -- split_frozen ---------------------------------------------------------------------------------


SPLIT = [
    "test_efficientnet",
    "test_resnet",
    "test_convnext",
    "mobilenetv2_100",
    "tf_efficientnet_lite0",
] + [
    pytest.param(n, marks=pytest.mark.slow)
    for n in (
        "resnet50",
        "densenet121",
        "inception_v3",
        "legacy_xception",
        "inception_resnet_v2",
        "vgg19",
        "convnext_tiny",
        "regnety_016",
    )
]


@pytest.mark.parametrize("name", SPLIT)
def test_split_frozen_is_equivalent_at_every_depth(name: str):
    x = _gray(name, batch=3)
    base = _build(name)
    assert base.split_frozen() is None  # nothing frozen
    depths = range(1, base.num_stages + 1)
    if not name.startswith("test_"):  # real models: a few depths keep the default run quick
        depths = sorted({1, base.num_stages // 2, base.num_stages - 1, base.num_stages})
    for n in depths:
        model = _build(name, n)
        model.load_state_dict(base.state_dict())
        split = model.split_frozen()
        assert split is not None, n
        prefix, rest = split
        model.eval()
        with torch.no_grad():
            assert torch.allclose(rest(prefix(x)), model(x), atol=1e-5), n
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert {id(p) for p in rest.parameters()} == trainable
        assert not any(p.requires_grad for p in prefix.parameters())
        prefix.train()
        assert not any(m.training for m in prefix.modules())


def test_split_frozen_full_depth_is_forward_features_and_head():
    model = _build("test_vit", num_stages("test_vit"))
    prefix, rest = model.split_frozen()
    x = _gray("test_vit")
    model.eval()
    with torch.no_grad():
        feats = prefix(x)
        assert torch.allclose(feats, model.forward_features(x))
        assert torch.allclose(rest(feats), model(x), atol=1e-6)
    assert {id(p) for p in rest.parameters()} == {id(p) for p in model.head.parameters()}
    # ViT's forward_features is not a chain of modules (position embedding): no split inside
    assert _build("test_vit", 2).split_frozen() is None


def test_training_rest_on_cached_features_equals_training_the_model():
    name = "test_efficientnet"
    a, b = _build(name, 2), _build(name, 2)
    b.load_state_dict(a.state_dict())
    x = _gray(name, batch=4)
    prefix, rest = b.split_frozen()
    with torch.no_grad():
        feats = prefix(x)
    _train_step(a, x)
    _train_step(rest, feats)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.allclose(va, vb, atol=1e-6), ka


# -- gray modes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "mobilenetv2_100", "test_vit"])
def test_gray_modes_build_1_and_3_channel_stems(name: str):
    for mode, chans in (("replicate", 3), ("sum", 1)):
        model = _build(name, gray_mode=mode).eval()
        first = get_backbone(name)
        conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
        assert conv.in_channels == chans, (first.name, mode)
        assert model.input_norm.mean.shape[1] == chans
        with torch.no_grad():
            assert model(_gray(name)).shape == (2, 3)


def test_fold_ensemble_is_the_equal_weight_weighted_ensemble() -> None:
    """Issue 25: `CxrEnsemble` (fold ensembles) and `WeightedEnsemble` (Caruana selection)
    were two classes with one forward; the fold ensemble is now the equal-weight case. Its
    output is the plain mean (bit-identical to before), its state dict still holds the members
    only (exported fold ensembles load as they did), and unequal weights mix as weighted."""
    from automl_cxr.models import CxrEnsemble, WeightedEnsemble

    torch.manual_seed(0)
    members = [_build("test_efficientnet").eval() for _ in range(3)]
    x = _gray("test_efficientnet", batch=2)
    fold = CxrEnsemble(members).eval()
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in members])
        assert torch.equal(fold(x), torch.log(probs.mean(dim=0).clamp_min(1e-12)))
        mixed = WeightedEnsemble(members, [1.0, 2.0, 1.0]).eval()(x)
        want = (probs * torch.tensor([0.25, 0.5, 0.25])[:, None, None]).sum(dim=0)
        assert torch.allclose(mixed, torch.log(want), atol=1e-6)
    assert isinstance(fold, WeightedEnsemble)
    assert not any(k == "weights" for k in fold.state_dict())
    assert "weights" in WeightedEnsemble(members, [1.0, 2.0, 1.0]).state_dict()
    rebuilt = CxrEnsemble.from_config(members[0].config, 3)
    rebuilt.load_state_dict(fold.state_dict())  # strict: same keys as before the merge
    with pytest.raises(ConfigError, match="one model configuration"):
        CxrEnsemble([members[0], _build("test_resnet")])
