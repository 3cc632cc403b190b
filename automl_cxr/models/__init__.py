"""Model builder: backbone catalogue, frozen depth, head registry, pretrained weights.

>>> from automl_cxr.models import ModelConfig, build_model
>>> model = build_model(ModelConfig("mobilenetv2_100", num_classes=3, frozen_stages=4))
>>> logits = model(gray_images)  # (B, 1, H, W) in [0, 1] → (B, 3)
"""

from __future__ import annotations

from automl_cxr.models._builder import (
    GRAY_MODES,
    CxrModel,
    FrozenPrefix,
    GrayNormalize,
    ModelConfig,
    TrainableRest,
    build_model,
)
from automl_cxr.models._catalogue import (
    BackboneSpec,
    get_backbone,
    list_backbones,
    register_backbone,
)
from automl_cxr.models._convert import convert_state_dict, read_state_dict
from automl_cxr.models._ensemble import CxrEnsemble, WeightedEnsemble
from automl_cxr.models._freeze import (
    ArchInfo,
    analyse_arch,
    arch_info,
    check_frozen_stages,
    freeze_plan,
    num_stages,
)
from automl_cxr.models._heads import (
    ACTIVATIONS,
    POOLS,
    FeaturePool,
    PooledHead,
    build_head,
    combine_pooled,
    list_heads,
    pool_vectors,
    register_head,
)
from automl_cxr.models._load import load_backbone
from automl_cxr.models._weights import (
    WEIGHT_KINDS,
    WeightSource,
    file_sha256,
    is_online,
    resolve_weights,
    weights_env_var,
)

__all__ = [
    "freeze_plan",
    "ACTIVATIONS",
    "GRAY_MODES",
    "POOLS",
    "WEIGHT_KINDS",
    "ArchInfo",
    "BackboneSpec",
    "CxrEnsemble",
    "WeightedEnsemble",
    "CxrModel",
    "FeaturePool",
    "FrozenPrefix",
    "GrayNormalize",
    "ModelConfig",
    "PooledHead",
    "TrainableRest",
    "WeightSource",
    "analyse_arch",
    "combine_pooled",
    "pool_vectors",
    "arch_info",
    "build_head",
    "build_model",
    "check_frozen_stages",
    "convert_state_dict",
    "file_sha256",
    "get_backbone",
    "is_online",
    "list_backbones",
    "list_heads",
    "load_backbone",
    "num_stages",
    "read_state_dict",
    "register_backbone",
    "register_head",
    "resolve_weights",
    "weights_env_var",
]
