"""Where a trial runs and at what precision: the device, and whether mixed precision pays
(CUDA float16/bfloat16; CPU bfloat16 only where the CPU computes it natively)."""

from __future__ import annotations

import torch

from automl_cxr._compat.torch import cpu_bf16_supported
from automl_cxr.errors import ConfigError

__all__ = ["amp_plan", "resolve_device", "run_precision"]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available here")
    return dev


def amp_plan(device: torch.device, amp: bool, cpu_amp: bool) -> tuple[bool, torch.dtype]:
    """(autocast on, its dtype) for a run on `device`: AMP on CUDA (bf16 where the GPU has it,
    else fp16); on CPU bfloat16 only when asked for and native."""
    if device.type == "cuda":
        return amp, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return bool(amp and cpu_amp and device.type == "cpu" and cpu_bf16_supported()), torch.bfloat16


def run_precision(device: str, *, cpu_amp: bool, amp: bool = True) -> str:
    """What a run's trials compute in, for its protocol: "fp32", "bf16", "fp16", or "amp" for
    GPUs this process cannot see (a Ray cluster's: bf16 or fp16 by GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "amp" if amp else "fp32"
    on, dtype = amp_plan(resolve_device(device), amp, cpu_amp)
    return ("bf16" if dtype == torch.bfloat16 else "fp16") if on else "fp32"
