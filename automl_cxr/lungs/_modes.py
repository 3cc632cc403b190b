"""Names of the preprocessing levers (torch-free, for configs and search spaces)."""

from __future__ import annotations

__all__ = ["INTENSITY_MODES", "ROI_MODES"]

ROI_MODES = ("full", "lung_crop", "lung_mask")
INTENSITY_MODES = ("none", "equalize", "clahe")
