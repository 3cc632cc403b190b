"""Every use of torch's private API, in one place (tests/test_layout.py finds any other).

- `cpu_bf16_supported`: `torch.ops.mkldnn._is_mkldnn_bf16_supported` (no public query);
- `clone_module`: a fast `copy.deepcopy` of a module tree, which reads `nn.Module`'s
  `_parameters`, `_buffers` and `_modules` dicts directly.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

__all__ = ["clone_module", "cpu_bf16_supported"]


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's AVX512-BF16 or AMX kernels), so
    that `TrainConfig.cpu_amp` pays; on other CPUs bfloat16 is emulated and slower."""
    mkldnn = torch.backends.mkldnn
    return bool(mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def clone_module(module: nn.Module) -> nn.Module:
    """An independent copy of `module`: what `copy.deepcopy` gives (own parameters, buffers,
    submodules and hook dicts; `requires_grad` and shared parameters kept), about twice as
    fast, since only tensors and the module tree are copied; other attributes are shared if
    immutable, shallow-copied if a dict, list or set. Falls back to `copy.deepcopy` for a
    tree with a module that defines its own copying or is parametrized."""
    for m in module.modules():
        if (
            _copies_itself(type(m))
            or nn.utils.parametrize.is_parametrized(m)
            or any(type(p) is not nn.Parameter for p in m._parameters.values() if p is not None)
        ):
            return copy.deepcopy(module)
    return _clone(module, {})


_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")


@functools.cache
def _copies_itself(cls: type) -> bool:
    """Whether a class outside torch.nn defines how it is copied or unpickled (torch.nn's own,
    e.g. `_ConvNd.__setstate__`, only fill in attributes that old pickles lack)."""
    for name in _COPY_HOOKS:
        owner = next((c for c in cls.__mro__ if name in c.__dict__), object)
        if owner is not object and not owner.__module__.startswith("torch.nn."):
            return True
    return False


def _clone(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    new = object.__new__(type(module))
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "_parameters":
            state[key] = {n: _clone_param(p, memo) for n, p in value.items()}
        elif key == "_buffers":
            state[key] = {n: _clone_tensor(b, memo) for n, b in value.items()}
        elif key == "_modules":
            state[key] = {n: None if c is None else _clone(c, memo) for n, c in value.items()}
        elif isinstance(value, torch.Tensor):
            state[key] = copy.deepcopy(value, memo)
        elif isinstance(value, (dict, list, set)):
            state[key] = value.copy()  # hook dicts are OrderedDicts: .copy() keeps the type
        else:
            state[key] = value
    new.__dict__.update(state)
    return new


def _clone_param(p: nn.Parameter | None, memo: dict[int, Any]) -> nn.Parameter | None:
    if p is None:
        return None
    if id(p) not in memo:
        memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    return memo[id(p)]


def _clone_tensor(t: torch.Tensor | None, memo: dict[int, Any]) -> torch.Tensor | None:
    if t is None:
        return None
    if id(t) not in memo:
        memo[id(t)] = t.detach().clone()
    return memo[id(t)]
