"""Every use of timm's private API, in one place (tests/test_layout.py finds any other).

- `group_with_matcher` (`timm.models._manipulate`): timm's public `group_parameters` groups
  parameters only; the frozen-stage plan must place buffers too (BatchNorm statistics).
- `checkpoint_filter`: the `checkpoint_filter_fn` a timm model module defines to convert
  original-layout checkpoints (not exported; found through the model class's module).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from timm.models._manipulate import group_with_matcher
from torch import nn

__all__ = ["checkpoint_filter", "group_with_matcher"]


def checkpoint_filter(model: nn.Module) -> Callable[[dict, nn.Module], dict] | None:
    """The `checkpoint_filter_fn(state_dict, model)` of the timm module defining `model`'s
    class, or None when it defines none."""
    module: Any = sys.modules.get(type(model).__module__)
    filt = getattr(module, "checkpoint_filter_fn", None)
    return filt if callable(filt) else None
