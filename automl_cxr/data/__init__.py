"""Data layer: public sources → recipes/manifests → decoded image cache."""

from __future__ import annotations

from automl_cxr.data._dataset import CACHE_VERSION, PreparedDataset, list_datasets, load_dataset
from automl_cxr.data._image import MIN_SIDE, DecodedImage, decode_gray, resize_square
from automl_cxr.data._prepare import (
    MANIFEST_COLUMNS,
    manifest_hash,
    prepare_recipes,
    prepare_table,
    scan_images,
)
from automl_cxr.data._recipes import Recipe, get_recipe, list_recipes, register_recipe
from automl_cxr.data._sources import (
    SourceTable,
    read_cohen,
    read_csv_manifest,
    read_folder,
    read_kermany,
)

__all__ = [
    "CACHE_VERSION",
    "MANIFEST_COLUMNS",
    "MIN_SIDE",
    "DecodedImage",
    "PreparedDataset",
    "Recipe",
    "SourceTable",
    "decode_gray",
    "get_recipe",
    "list_datasets",
    "list_recipes",
    "load_dataset",
    "manifest_hash",
    "prepare_recipes",
    "prepare_table",
    "read_cohen",
    "read_csv_manifest",
    "read_folder",
    "read_kermany",
    "register_recipe",
    "resize_square",
    "scan_images",
]
