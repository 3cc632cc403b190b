"""Deployable models: pick a study trial, retrain it, export TorchScript + ONNX + model card,
predict (with Grad-CAM), and evaluate on external sets.

    >>> from automl_cxr.deploy import run_export, ExportedModel, predict_images
    >>> run_export("studies/three_class.db", "models/best")
    >>> predict_images(ExportedModel("models/best"), ["x.png"], explain=True)
"""

from __future__ import annotations

from automl_cxr.deploy._card import INPUT_CONTRACT, INTENDED_USE, build_card
from automl_cxr.deploy._card_text import render_card
from automl_cxr.deploy._commands import open_trial, run_diagnose, run_evaluate, run_export
from automl_cxr.deploy._evaluate import (
    ExternalSet,
    evaluate_predictions,
    load_external,
)
from automl_cxr.deploy._export import (
    MODEL_FILES,
    ONNX_EXPORTERS,
    export_model,
    export_onnx,
    export_torchscript,
    export_trial,
    source_roots,
)
from automl_cxr.deploy._gradcam import (
    find_target_layer,
    gradcam_map,
    gradcam_overlay,
    save_gradcam,
)
from automl_cxr.deploy._predict import (
    RUNTIMES,
    ExportedModel,
    load_image,
    predict_images,
    softmax,
)
from automl_cxr.deploy._select import (
    TrialSpec,
    load_study,
    select_trial,
    training_data,
    trial_spec,
)

__all__ = [
    "INPUT_CONTRACT",
    "INTENDED_USE",
    "MODEL_FILES",
    "ONNX_EXPORTERS",
    "RUNTIMES",
    "ExportedModel",
    "ExternalSet",
    "TrialSpec",
    "build_card",
    "evaluate_predictions",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "export_trial",
    "find_target_layer",
    "gradcam_map",
    "gradcam_overlay",
    "load_external",
    "load_image",
    "load_study",
    "open_trial",
    "predict_images",
    "render_card",
    "run_diagnose",
    "run_evaluate",
    "run_export",
    "save_gradcam",
    "select_trial",
    "softmax",
    "source_roots",
    "trial_spec",
    "training_data",
]
