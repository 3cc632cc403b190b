"""How far an exported model's runtimes are from PyTorch on real films (README, "The same
transform everywhere"; the runtime check of `export` uses uniform noise instead).

    python benchmarks/onnx_parity.py MODEL_DIR [--films 6] [--json FILE]

Runs the first N Cohen and N NIH films of the shared data through the export's PyTorch,
TorchScript and ONNX graphs and prints the largest logit and probability differences. For a
graph with the roi/intensity layer it also exports that layer alone to ONNX (the legacy
exporter) and counts the pixels whose output differs from PyTorch's (by one gray level at a
rounding boundary).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from automl_cxr.deploy import ExportedModel, load_image
from automl_cxr.settings import default_sources_dir


def _films(data: Path, n: int) -> list[Path]:
    cohen = sorted((data / "cohen" / "images").glob("*.jp*g"))[:n]
    nih = sorted((data / "nih" / "images").glob("*.png"))[:n]
    return cohen + nih


def _layer_pixels(model_dir: Path, x: np.ndarray) -> dict | None:
    """(pixels differing, pixels) of the roi/intensity layer alone under ONNX Runtime."""
    from automl_cxr.deploy._runtime import onnx_session
    from automl_cxr.lungs import Preprocess

    net = ExportedModel(model_dir, runtime="pytorch").torch_model()
    pre = next((m for m in net.modules() if isinstance(m, Preprocess)), None)
    if pre is None:
        return None
    xt = torch.from_numpy(x).float()
    with torch.no_grad():
        ref = pre.eval()(xt).numpy()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "layer.onnx"
        torch.onnx.export(
            pre, xt[:1], str(path), input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False
        )
        sess = onnx_session(path)
        out = sess.run(None, {"x": x.astype(np.float32)})[0]
    return {"differing": int((np.abs(out - ref) > 1e-6).sum()), "pixels": int(ref.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--films", type=int, default=6, help="films per source (Cohen, NIH)")
    ap.add_argument("--data", type=Path, default=default_sources_dir())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    models = {
        rt: ExportedModel(args.model_dir, runtime=rt) for rt in ("pytorch", "torchscript", "onnx")
    }
    films = _films(args.data, args.films)
    x = np.stack([load_image(p, models["pytorch"].resolution).tensor for p in films])
    ref = models["pytorch"].logits(x)
    p_ref = models["pytorch"].predict_proba(x)
    res = {
        "model": str(args.model_dir),
        "films": len(films),
        "max_abs_logit": float(np.abs(ref).max()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
    }
    for rt in ("torchscript", "onnx"):
        res[rt] = {
            "max_logit_diff": float(np.abs(models[rt].logits(x) - ref).max()),
            "max_prob_diff": float(np.abs(models[rt].predict_proba(x) - p_ref).max()),
        }
    res["layer_alone_onnx"] = _layer_pixels(args.model_dir, x)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
