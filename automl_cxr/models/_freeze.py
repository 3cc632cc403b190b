"""Frozen depth: a backbone's coarse stages, what freezing the first N of them means, and
how its `forward_features` splits into a frozen prefix and a trainable rest.

Stages come from timm's `group_matcher(coarse=True)` (the grouping timm uses for layer-wise
learning-rate decay), over the tensors `forward_features` actually uses; VGG and
Inception-ResNet-v2 get a coarser matcher (timm's puts every conv layer / repeat block in its
own group). Everything is worked out once per architecture on the `meta` device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import split_model_name_tag
from torch import nn

from automl_cxr._compat.timm import group_with_matcher
from automl_cxr.errors import ConfigError

__all__ = [
    "ArchInfo",
    "analyse_arch",
    "arch_info",
    "check_frozen_stages",
    "freeze_plan",
    "num_stages",
]


@dataclass(frozen=True)
class ArchInfo:
    """What the builder needs to know about one timm architecture (headless, 3 channels).

    Attributes:
        unused: top-most submodules holding tensors that `forward_features` never calls
            (e.g. VGG's fc6/fc7 `pre_logits`, ConvNeXt's head norm): the builder drops them.
        stage_of: tensor name (parameters and buffers) → coarse stage index.
        sequence: `forward_features` as an ordered list of submodule names, when it is a plain
            chain of module calls (checked numerically on first use), else None.
        layout: "NCHW", "NHWC" or "NLC" (tokens) for the `forward_features` output.
    """

    arch: str
    num_features: int
    layout: str
    num_params: int
    num_stages: int
    unused: tuple[str, ...]
    stage_of: dict[str, int]
    sequence: tuple[str, ...] | None
    probe_size: int


def _vgg_matcher(model: nn.Module) -> Callable[[str], float]:
    """VGG: one stage per conv block (ended by a max-pool), not one per layer."""
    block_of: dict[str, int] = {}
    block = 0
    for idx, layer in enumerate(model.features):
        block_of[str(idx)] = block
        if isinstance(layer, nn.MaxPool2d):
            block += 1

    def match(name: str) -> float:
        parts = name.split(".")
        if parts[0] == "features" and len(parts) > 1 and parts[1] in block_of:
            return block_of[parts[1]]
        return math.inf

    return match


def _inception_resnet_v2_matcher(model: nn.Module) -> Callable[[str], float]:
    """Inception-ResNet-v2: stem, then one stage per mixed / repeat block (8 stages)."""
    order = ["mixed_5b", "repeat", "mixed_6a", "repeat_1", "mixed_7a", "repeat_2"]

    def match(name: str) -> float:
        top = name.split(".")[0]
        if top.startswith(("conv2d_1", "conv2d_2", "conv2d_3", "conv2d_4", "maxpool")):
            return 0
        if top in order:
            return 1 + order.index(top)
        if top in ("block8", "conv2d_7b"):
            return len(order) + 1
        return math.inf

    return match


_MATCHERS: dict[str, Callable[[nn.Module], Callable[[str], float]]] = {
    "VGG": _vgg_matcher,
    "InceptionResnetV2": _inception_resnet_v2_matcher,
}


def _coarse_matcher(model: nn.Module, called_top: list[str]) -> object:
    custom = _MATCHERS.get(type(model).__name__)
    if custom is not None:
        return custom(model)
    try:
        return model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        order = {n: i for i, n in enumerate(called_top)}  # fallback: one stage per top module
        return lambda name: order.get(name.split(".")[0], math.inf)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Run `forward_features`, returning its output and the call order of named submodules."""
    called: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, n=name: called.append(n))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            out = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return out, called


@functools.lru_cache(maxsize=256)
def arch_info(arch: str) -> ArchInfo:
    """The analysis of a timm architecture: once per process, and kept on disk.

    The disk copy (`$AUTOML_CXR_CACHE` or `~/.cache/automl-cxr`, `arch/`) is keyed by the
    timm and torch versions and this module's source, so it never outlives what produced it.
    """
    arch = split_model_name_tag(arch)[0]
    path = _cache_file(arch)
    if path is not None and path.is_file():
        try:
            return _from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or stale layout: recompute
    info = analyse_arch(arch)
    if path is not None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(dataclasses.asdict(info)))
            os.replace(tmp, path)
    return info


@functools.lru_cache(maxsize=1)
def _source_key() -> str:
    blob = f"{timm.__version__}|{torch.__version__}|".encode() + Path(__file__).read_bytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def _cache_file(arch: str) -> Path | None:
    """`$AUTOML_CXR_CACHE/arch/<key>/<arch>.json` (None when AUTOML_CXR_NO_CACHE is set)."""
    if os.environ.get("AUTOML_CXR_NO_CACHE", "").lower() in ("1", "true", "yes"):
        return None
    root = os.environ.get("AUTOML_CXR_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "automl-cxr"
    return base / "arch" / _source_key() / f"{arch}.json"


def _from_json(d: dict) -> ArchInfo:
    d["unused"] = tuple(d["unused"])
    d["sequence"] = tuple(d["sequence"]) if d["sequence"] is not None else None
    d["stage_of"] = {str(k): int(v) for k, v in d["stage_of"].items()}
    return ArchInfo(**d)


def analyse_arch(arch: str) -> ArchInfo:
    """Analyse a timm architecture (on the meta device, falling back to CPU); uncached."""
    arch = split_model_name_tag(arch)[0]
    cfg = timm.models.get_pretrained_cfg(arch)
    size = tuple(cfg.input_size[-2:]) if cfg is not None and cfg.input_size else (224, 224)
    try:
        with torch.device("meta"):  # no memory, no init: shapes only
            model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
        out, called = _trace(model, torch.empty(1, 3, *size, device="meta"))
    except Exception:  # an op without a meta kernel: analyse a real (random) model instead
        model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
        out, called = _trace(model, torch.zeros(1, 3, *size))

    nf = int(getattr(model, "num_features", 0) or 0)
    if out.ndim == 4:
        layout = "NHWC" if out.shape[1] != nf and out.shape[-1] == nf else "NCHW"
        nf = int(out.shape[-1] if layout == "NHWC" else out.shape[1])
    elif out.ndim == 3:
        layout, nf = "NLC", int(out.shape[-1])
    else:
        raise ConfigError(
            f"backbone {arch!r} is not supported: forward_features returns shape "
            f"{tuple(out.shape)}, expected (B, C, H, W) or (B, N, C)"
        )

    reached = {".".join(c.split(".")[:i]) for c in called for i in range(1, c.count(".") + 2)}
    unused: list[str] = []
    for name, module in model.named_modules():
        if not name or name in reached or any(name.startswith(u + ".") for u in unused):
            continue
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            unused.append(name)

    def kept(tensor_name: str) -> bool:
        return not any(tensor_name.startswith(u + ".") for u in unused)

    top_called: list[str] = []
    for name in called:
        if "." not in name and name not in top_called:
            top_called.append(name)
    tensors = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if kept(n)]
    groups = group_with_matcher(tensors, _coarse_matcher(model, top_called), reverse=True)
    ranks = {g: i for i, g in enumerate(sorted(set(groups.values())))}
    stage_of = {n: ranks[g] for n, g in groups.items()}
    n_params = sum(p.numel() for n, p in model.named_parameters() if kept(n))

    sequence = _sequence(model, called, stage_of)
    return ArchInfo(
        arch=arch,
        num_features=nf,
        layout=layout,
        num_params=n_params,
        num_stages=max(ranks.values(), default=-1) + 1,
        unused=tuple(unused),
        stage_of=stage_of,
        sequence=sequence,
        probe_size=max(64, min(size) // 3),
    )


def _stages_by_module(stage_of: dict[str, int]) -> dict[str, set[int]]:
    """Module name → the stages of all tensors below it."""
    out: dict[str, set[int]] = {}
    for name, stage in stage_of.items():
        parts = name.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]), set()).add(stage)
    return out


def _sequence(model: nn.Module, called: list[str], stage_of: dict[str, int]) -> tuple | None:
    """`forward_features` as a chain of submodules, finer where a module spans stages."""
    if any("." not in n for n in stage_of):
        return None  # tensors on the root (e.g. ViT's pos_embed) are used outside any child
    counts: dict[str, int] = {}
    for name in called:
        if "." not in name:
            counts[name] = counts.get(name, 0) + 1
    if any(c != 1 for c in counts.values()):
        return None  # a top-level module is called twice: not a plain chain
    under = _stages_by_module(stage_of)
    seq = list(counts)  # first-call order
    out: list[str] = []
    while seq:
        name = seq.pop(0)
        module = model.get_submodule(name)
        if len(under.get(name, ())) > 1 and _is_plain_sequential(module):
            seq[:0] = [f"{name}.{child}" for child, _ in module.named_children()]
        else:
            out.append(name)
    covered = sum(len([n for n in stage_of if n.startswith(e + ".")]) for e in out)
    if covered != len(stage_of):
        return None
    return tuple(out)


def num_stages(name: str) -> int:
    """How many coarse stages of backbone `name` can be frozen (`frozen_stages` ≤ this)."""
    from automl_cxr.models._catalogue import get_backbone

    return arch_info(get_backbone(name).arch).num_stages


def check_frozen_stages(name: str, frozen_stages: int) -> int:
    """`frozen_stages` if it lies in 0..num_stages(name), else a ConfigError naming both."""
    n = num_stages(name)
    if not 0 <= frozen_stages <= n:
        raise ConfigError(
            f"frozen_stages must be between 0 and {n} for {name}, "
            f"but got frozen_stages={frozen_stages}"
        )
    return frozen_stages


@dataclass(frozen=True)
class FreezePlan:
    """What freezing the first `frozen` stages does to one architecture.

    `modules`: top-most backbone submodules whose tensors are all frozen (kept in eval mode);
    `split`: index into `info.sequence` where the trainable rest starts, or None if the chain
    cannot be cut there (or there is no chain). Parameter-free chain elements right after the
    last frozen one belong to the frozen prefix (and are kept in eval mode too).
    """

    frozen: int
    tensors: frozenset[str]
    modules: tuple[str, ...]
    split: int | None


def freeze_plan(info: ArchInfo, frozen: int) -> FreezePlan:
    """The plan for freezing the first `frozen` stages (0 ≤ frozen ≤ info.num_stages)."""
    tensors = frozenset(n for n, s in info.stage_of.items() if s < frozen)
    if frozen == 0:
        return FreezePlan(0, tensors, (), None)
    if frozen >= info.num_stages:
        return FreezePlan(frozen, tensors, ("",), None)
    under = _stages_by_module(info.stage_of)
    modules: list[str] = []
    for name in sorted(under, key=lambda n: n.count(".")):  # parents before children
        if max(under[name]) < frozen and not any(name.startswith(m + ".") for m in modules):
            modules.append(name)
    split = None
    if info.sequence is not None:
        stages = [under.get(e, set()) for e in info.sequence]
        k = max((i + 1 for i, s in enumerate(stages) if s and min(s) < frozen), default=0)
        while k < len(stages) and not stages[k]:
            k += 1  # parameter-free modules (activation, pooling) join the frozen prefix
        before = set().union(*stages[:k]) if k else set()
        after = set().union(*stages[k:]) if k < len(stages) else set()
        if all(s < frozen for s in before) and all(s >= frozen for s in after):
            split = k
            modules += [e for e, s in zip(info.sequence[:k], stages[:k], strict=True) if not s]
    return FreezePlan(frozen, tensors, tuple(modules), split)
