"""How far an exported model's runtimes are from PyTorch on real films (README, "The same
transform everywhere"; the runtime check of `export` uses uniform noise instead).

    python benchmarks/onnx_parity.py MODEL_DIR [--films 6] [--json FILE] [--against REV]

Runs the first N Cohen and N NIH films of the shared data through the export's PyTorch,
TorchScript and ONNX graphs and prints the largest logit and probability differences. For a
graph with the roi/intensity layer it also exports that layer alone to ONNX (as `export`
does), for the model's levers and every other roi x intensity on its segmenter, and counts
the pixels whose output differs from PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from automl_cxr.deploy import ExportedModel, load_image
from automl_cxr.settings import default_sources_dir


def _films(data: Path, n: int) -> list[Path]:
    cohen = sorted((data / "cohen" / "images").glob("*.jp*g"))[:n]
    nih = sorted((data / "nih" / "images").glob("*.png"))[:n]
    return cohen + nih


def _module_at(rev: str) -> ModuleType:
    """`automl_cxr/lungs/_preprocess.py` as it was at git revision `rev`."""
    src = subprocess.run(
        ["git", "show", f"{rev}:automl_cxr/lungs/_preprocess.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    name = f"_preprocess_at_{rev}"
    mod = ModuleType(name)
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:_preprocess.py", "exec"), mod.__dict__)
    return mod


def _onnx_differing(pre: torch.nn.Module, x: np.ndarray, ref: np.ndarray) -> int:
    """Pixels where `pre` exported as `export` exports it (`export_onnx`) leaves PyTorch."""
    from automl_cxr.deploy._export import export_onnx
    from automl_cxr.deploy._runtime import onnx_session

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "layer.onnx"
        export_onnx(pre, path, x.shape[-1])
        out = onnx_session(path).run(None, {"image": x.astype(np.float32)})[0]
    return int((np.abs(out - ref) > 1e-6).sum())


def _layer_pixels(model_dir: Path, x: np.ndarray, against: str | None) -> dict | None:
    """The roi/intensity layer alone, for the model's own levers and every roi x intensity on
    its segmenter: pixels whose ONNX Runtime output differs from PyTorch's; with `against`,
    the same for the layer at that git revision and the pixels where the two versions'
    PyTorch outputs differ."""
    from automl_cxr.lungs import INTENSITY_MODES, ROI_MODES, Preprocess, PreprocessSpec, Segmenter

    net = ExportedModel(model_dir, runtime="pytorch").torch_model()
    own = next((m for m in net.modules() if isinstance(m, Preprocess)), None)
    if own is None:
        return None
    xt = torch.from_numpy(x).float()
    res: dict = {"pixels": int(xt.shape[0] * own.resolution**2), "differing": {}}
    old = _module_at(against) if against else None
    if old is not None:
        res[against] = {"onnx_differing": {}, "changed_pixels": {}}
    seg = None if own.seg is None else Segmenter(own.seg, own.seg_size, "", "", {})
    for roi in ROI_MODES if seg is not None else ("full",):
        for mode in INTENSITY_MODES:
            pre = Preprocess(PreprocessSpec(roi, mode, "k"), own.resolution, seg).eval()
            with torch.no_grad():
                ref = pre(xt).numpy()
            own_levers = roi == own.roi and mode == own.mode
            name = f"{roi}+{mode}" + (" (the model's)" if own_levers else "")
            res["differing"][name] = _onnx_differing(pre, x, ref)
            if old is not None:
                before = old.Preprocess(old.PreprocessSpec(roi, mode, "k"), own.resolution, seg)
                with torch.no_grad():
                    ref_old = before.eval()(xt).numpy()
                res[against]["onnx_differing"][name] = _onnx_differing(before, x, ref_old)
                res[against]["changed_pixels"][name] = int((ref != ref_old).sum())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--films", type=int, default=6, help="films per source (Cohen, NIH)")
    ap.add_argument("--data", type=Path, default=default_sources_dir())
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--against", metavar="REV", help="also measure the layer as it was at this git revision"
    )
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
    res["layer_alone_onnx"] = _layer_pixels(args.model_dir, x, args.against)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
