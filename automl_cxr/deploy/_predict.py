"""Load an exported model folder and classify images with it (TorchScript, ONNX or PyTorch)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from automl_cxr.data import decode_gray, resize_square
from automl_cxr.deploy._dicom_sc import write_secondary_capture
from automl_cxr.deploy._gradcam import gradcam_map, gradcam_overlay
from automl_cxr.deploy._graphs import TemperatureScaled
from automl_cxr.deploy._runtime import onnx_session
from automl_cxr.errors import ConfigError, DataError
from automl_cxr.models import WeightedEnsemble

__all__ = [
    "RUNTIMES",
    "ExportedModel",
    "ImageInput",
    "load_image",
    "predict_images",
    "softmax",
]

RUNTIMES = ("torchscript", "onnx", "pytorch")
_RUNTIME_FILE = {"torchscript": "model.ts", "onnx": "model.onnx", "pytorch": "model.pt"}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ExportedModel:
    """A model folder written by `automl-cxr export`.

    `logits(x)` / `predict_proba(x)` take float32 arrays (B, 1, R, R) in [0, 1]; `runtime` picks
    TorchScript (default), ONNX (onnxruntime) or the PyTorch module rebuilt from `model.pt`.
    """

    def __init__(self, model_dir: str | Path, runtime: str = "torchscript") -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, but got {runtime!r}")
        d = Path(model_dir)
        if not d.exists():
            raise DataError(
                f"model directory {d} not found: create one with "
                "`automl-cxr export --study STUDY --out DIR`"
            )
        if not d.is_dir():
            raise DataError(f"model directory {d} is not a folder")
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            raise DataError(
                f"{d} is not an exported model (no config.json); create one with "
                "`automl-cxr export --study STUDY --out DIR`"
            )
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {cfg_path}: {exc}") from None
        for key in ("classes", "resolution", "model"):
            if key not in self.config:
                raise DataError(f"{cfg_path} lacks {key!r}: export the model again")
        file = d / _RUNTIME_FILE[runtime]
        if not file.is_file():
            raise DataError(f"{d} lacks {file.name} (needed for --runtime {runtime})")
        self.dir = d
        self.runtime = runtime
        self.classes: list[str] = list(self.config["classes"])
        self.resolution: int = int(self.config["resolution"])
        self._ts = None
        self._onnx = None
        self._torch = None

    # -- runtimes ------------------------------------------------------------------------
    def torch_model(self):
        """The CxrModel (or CxrEnsemble) rebuilt from config.json + model.pt (random init, then
        the saved weights: no pretrained weights needed), in eval mode on the CPU."""
        if self._torch is None:
            import torch

            from automl_cxr.models import CxrEnsemble, ModelConfig, build_model

            pt = self.dir / "model.pt"
            if not pt.is_file():
                raise DataError(f"{self.dir} lacks model.pt (needed for PyTorch / Grad-CAM)")

            def fresh(model_cfg: dict) -> ModelConfig:
                no_weights = {"pretrained": False, "weights_file": None}
                return ModelConfig.from_dict({**model_cfg, **no_weights})

            cfg = fresh(self.config["model"])
            members = (self.config.get("ensemble") or {}).get("members")
            selected = (self.config.get("selected_ensemble") or {}).get("members")
            if selected:
                model = WeightedEnsemble(
                    [build_model(fresh(m["model"])) for m in selected],
                    [float(m["weight"]) for m in selected],
                )
            elif members:
                model = CxrEnsemble.from_config(cfg, int(members))
            else:
                model = build_model(cfg)
            temperature = (self.config.get("calibration") or {}).get("temperature")
            if temperature is not None:
                model = TemperatureScaled(model, float(temperature))
            if self.config.get("preprocess"):  # roi/intensity levers: the graph's first layer
                from automl_cxr.lungs import Preprocessed, rebuild_preprocess

                model = Preprocessed(rebuild_preprocess(self.config["preprocess"]), model)
            state = torch.load(pt, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            self._torch = model.eval()
        return self._torch

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        r = self.resolution
        if x.ndim != 4 or x.shape[1:] != (1, r, r):
            raise ConfigError(f"input must have shape (B, 1, {r}, {r}), but got {x.shape}")
        if self.runtime == "onnx":
            if self._onnx is None:
                self._onnx = onnx_session(self.dir / "model.onnx")
            return self._onnx.run(None, {self._onnx.get_inputs()[0].name: x})[0]
        import torch

        if self.runtime == "torchscript":
            if self._ts is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._ts = torch.jit.load(str(self.dir / "model.ts"), map_location="cpu")
                self._ts.eval()
            net = self._ts
        else:
            net = self.torch_model()
        with torch.no_grad():
            return net(torch.from_numpy(x)).float().numpy()

    @property
    def operating_point(self) -> dict[str, Any] | None:
        """The operating point baked in by `export --operating-point` (threshold on the
        positive class), or None."""
        return self.config.get("operating_point") or None

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class index per row at the operating point (the arg-max without one)."""
        from automl_cxr.oof import decide

        op = self.operating_point
        if op is None:
            return np.asarray(probs).argmax(axis=1)
        return decide(probs, self.classes.index(op["positive"]), float(op["threshold"]))

    def predict_proba(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = [softmax(self.logits(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))


@dataclass
class ImageInput:
    path: Path
    pixels: np.ndarray  # original 8-bit gray (H, W)
    tensor: np.ndarray  # (1, R, R) float32 in [0, 1]
    dicom: bool = False


def load_image(path: str | Path, resolution: int) -> ImageInput:
    """Decode like the data layer (decode_gray → resize_square) into the model's input."""
    p = Path(path)
    img = decode_gray(p)
    x = resize_square(img.pixels, resolution).astype(np.float32) / 255.0
    return ImageInput(p, img.pixels, x[None], dicom=img.format == "DICOM")


def predict_images(
    model: ExportedModel,
    paths: list[str | Path],
    *,
    explain: bool = False,
    out_dir: str | Path = "gradcam",
    dicom_sc: bool = False,
) -> list[dict[str, Any]]:
    """Class probabilities of each image; with `explain`, a Grad-CAM overlay PNG
    `<stem>_gradcam.png` per image (original size) in `out_dir` for the predicted class.

    Returns one dict per image: ``path``, ``probabilities`` {class: p}, ``predicted`` (the
    arg-max), ``thresholded`` (the class at the model's operating point, None without one),
    ``width``, ``height`` and ``gradcam`` (the PNG path, or None). With `dicom_sc` (and
    `explain`), a DICOM input's overlay is also written as a Secondary Capture
    ``<stem>_gradcam.dcm`` (``gradcam_dicom``) in the patient's study.
    """
    if not paths:
        raise ConfigError("no images given: pass one or more image files")
    inputs = [load_image(p, model.resolution) for p in paths]
    probs = model.predict_proba(np.stack([i.tensor for i in inputs]))
    decisions = model.decide(probs)
    op = model.operating_point
    results = []
    out = Path(out_dir)
    used: dict[str, int] = {}
    for item, p in zip(inputs, probs, strict=True):
        k = int(np.argmax(p))
        rec: dict[str, Any] = {
            "path": str(item.path),
            "probabilities": {c: float(v) for c, v in zip(model.classes, p, strict=True)},
            "predicted": model.classes[k],
            "thresholded": None,
            "width": int(item.pixels.shape[1]),
            "height": int(item.pixels.shape[0]),
            "gradcam": None,
        }
        if op is not None:
            rec["thresholded"] = model.classes[int(decisions[len(results)])]
            rec["operating_point"] = {
                "positive": op["positive"],
                "threshold": float(op["threshold"]),
                "rule": op.get("rule"),
                "target": op.get("target"),
            }
        if explain:
            stem = item.path.stem
            n = used.get(stem, 0)
            used[stem] = n + 1
            name = f"{stem}_gradcam.png" if n == 0 else f"{stem}_{n}_gradcam.png"
            out.mkdir(parents=True, exist_ok=True)
            heat = gradcam_map(model.torch_model(), item.pixels, model.resolution, class_index=k)
            overlay = gradcam_overlay(item.pixels, heat)
            Image.fromarray(overlay).save(out / name, format="PNG")
            rec["gradcam"] = str(out / name)
            rec["gradcam_class"] = model.classes[k]
            rec["gradcam_dicom"] = None
            if dicom_sc and item.dicom:
                rec["gradcam_dicom"] = str(
                    write_secondary_capture(
                        item.path,
                        overlay,
                        out / name.replace(".png", ".dcm"),
                        description=f"Grad-CAM of class {model.classes[k]} (p = {p[k]:.3f}) "
                        f"by automl-cxr model {model.dir.name}; red = regions that raised the "
                        "score. Research only, not a medical device.",
                    )
                )
        results.append(rec)
    return results
