"""Grad-CAM heatmaps (pytorch_grad_cam) on the last convolutional feature map of the backbone,
overlaid on the original radiograph at its original size."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from automl_cxr.deploy._graphs import unwrap
from automl_cxr.deploy._runtime import require
from automl_cxr.errors import ConfigError
from automl_cxr.models import WeightedEnsemble

__all__ = ["find_target_layer", "gradcam_map", "gradcam_overlay", "save_gradcam"]


def _nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def find_target_layer(model: nn.Module, resolution: int) -> tuple[str, nn.Module, bool]:
    """(name, module, channels_last) of the Grad-CAM target: the backbone module that last
    produces a 4-D feature map in `forward_features` (found with forward hooks on a probe
    input, so it works for any timm CNN: the last stage, or the final conv/norm after it).

    Raises ConfigError for token-based backbones (ViT) that have no such map at the end.
    """
    backbone = model.backbone
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    hooks = []

    def hook(name: str):
        def record(_m, _inp, out) -> None:
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape)
                order.append(name)

        return record

    for name, m in backbone.named_modules():
        if name:
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = model.forward_features(torch.rand(1, 1, resolution, resolution))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if feats.ndim != 4:
        raise ConfigError(
            f"Grad-CAM needs a convolutional feature map, but backbone "
            f"{model.config.backbone!r} ends in tokens of shape {tuple(feats.shape)}"
        )
    nf = getattr(model, "num_features", None)
    channels_last = feats.shape[1] != nf and feats.shape[-1] == nf

    def is_map(shape: tuple[int, ...]) -> bool:
        if len(shape) != 4:
            return False
        return shape[-1] == feats.shape[-1] if channels_last else shape[1] > 1

    candidates = [n for n in order if is_map(shapes[n])]
    if not candidates:
        raise ConfigError(
            f"no 4-D feature map found in backbone {model.config.backbone!r} for Grad-CAM"
        )
    name = candidates[-1]
    return name, backbone.get_submodule(name), channels_last


def gradcam_map(
    model: nn.Module, pixels: np.ndarray, resolution: int, class_index: int | None = None
) -> np.ndarray:
    """Grad-CAM of `class_index` (None: the predicted class) for one 8-bit gray image `pixels`
    (H, W) of any size; returns an (H, W) float32 map in [0, 1] at the ORIGINAL size.

    For a fold ensemble (`CxrEnsemble`), the mean of its members' maps for the ensemble's class;
    for a selected ensemble (`WeightedEnsemble`) their weighted mean.
    """
    from automl_cxr.data import resize_square

    pre = getattr(model, "preprocess", None)
    if pre is not None:  # roi/intensity levers: the map of what the model saw, placed back
        return _preprocessed_map(model, pre, pixels, class_index)
    model, _ = unwrap(model)  # temperature scaling does not change the class or the map
    x = torch.from_numpy(resize_square(pixels, resolution).astype(np.float32) / 255.0)[None, None]
    if isinstance(model, WeightedEnsemble):  # a fold ensemble (CxrEnsemble) too
        if class_index is None:
            with torch.no_grad():
                class_index = int(model.eval()(x).argmax(dim=1)[0])
        maps = [gradcam_map(m, pixels, resolution, class_index) for m in model.members]
        w = model.weights.numpy()
        return np.clip(np.tensordot(w, np.stack(maps), axes=1), 0.0, 1.0).astype(np.float32)

    GradCAM = require("pytorch_grad_cam", "grad-cam", "Grad-CAM (--explain)").GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = copy.deepcopy(model).eval()
    for p in net.parameters():  # frozen stages too: the target layer's output needs a grad
        p.requires_grad_(True)
    _, layer, channels_last = find_target_layer(net, resolution)
    targets = None if class_index is None else [ClassifierOutputTarget(int(class_index))]
    with GradCAM(
        model=net,
        target_layers=[layer],
        reshape_transform=_nhwc_to_nchw if channels_last else None,
    ) as cam:
        heat = cam(input_tensor=x, targets=targets)[0]
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
    h, w = pixels.shape[:2]
    big = Image.fromarray(heat, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(big, dtype=np.float32), 0.0, 1.0)


def _preprocessed_map(
    model: nn.Module, pre: nn.Module, pixels: np.ndarray, class_index: int | None
) -> np.ndarray:
    """Grad-CAM on the preprocessed (cropped, masked, equalised) model input, mapped back onto
    the original film through the crop's inverse (zero outside the crop)."""
    import torch.nn.functional as F

    from automl_cxr.data import resize_square
    from automl_cxr.lungs import CANVAS

    canvas = torch.from_numpy(resize_square(pixels, CANVAS).astype(np.float32) / 255.0)[None, None]
    with torch.no_grad():
        seen, _, theta = pre.crop(canvas)  # (1, 1, R, R): exactly the model's input
    theta = theta[0]
    r = int(seen.shape[-1])
    seen_px = np.asarray(torch.round(seen[0, 0] * 255).byte().numpy())
    heat = gradcam_map(model.model, seen_px, r, class_index)  # (R, R)
    sx, sy, tx, ty = float(theta[0, 0]), float(theta[1, 1]), float(theta[0, 2]), float(theta[1, 2])
    inv = torch.tensor([[1 / sx, 0.0, -tx / sx], [0.0, 1 / sy, -ty / sy]]).unsqueeze(0)
    h, w = pixels.shape[:2]
    grid = F.affine_grid(inv, [1, 1, h, w], align_corners=False)
    back = F.grid_sample(
        torch.from_numpy(heat)[None, None], grid, align_corners=False, padding_mode="zeros"
    )
    return np.clip(back[0, 0].numpy().astype(np.float32), 0.0, 1.0)


def gradcam_overlay(pixels: np.ndarray, heat: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the radiograph with the heatmap (jet colour map) blended over it."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    gray = pixels.astype(np.float32) / 255.0
    rgb = np.repeat(gray[..., None], 3, axis=2)
    return show_cam_on_image(rgb, heat, use_rgb=True, image_weight=image_weight)


def save_gradcam(
    model: nn.Module,
    pixels: np.ndarray,
    resolution: int,
    path: str | Path,
    class_index: int | None = None,
) -> Path:
    """Write the Grad-CAM overlay PNG for one image at its original size; returns the path."""
    heat = gradcam_map(model, pixels, resolution, class_index)
    out = Path(path)
    Image.fromarray(gradcam_overlay(pixels, heat)).save(out, format="PNG")
    return out
