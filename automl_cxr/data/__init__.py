"""Data layer: public sources → recipes/manifests → decoded image cache."""

from __future__ import annotations

from automl_cxr.data._dataset import (
    CACHE_VERSION,
    PreparedDataset,
    canonical_order,
    list_datasets,
    load_dataset,
    row_order_digest,
    save_npy_atomic,
)
from automl_cxr.data._image import (
    MIN_SIDE,
    DecodedImage,
    decode_gray,
    resize_square,
    thumbnail,
    thumbnail_pairs,
)
from automl_cxr.data._prepare import (
    MANIFEST_COLUMNS,
    NEAR_DUPLICATE_THRESHOLD,
    default_recipes,
    excluded_images,
    manifest_hash,
    patients_at_several_sites,
    prepare_recipes,
    prepare_table,
    scan_images,
    site_groups,
)
from automl_cxr.data._recipes import Recipe, get_recipe, list_recipes, register_recipe
from automl_cxr.data._sources import (
    COHEN_FINDINGS,
    SourceTable,
    cohen_label,
    read_cohen,
    read_csv_manifest,
    read_folder,
    read_kermany,
    read_nih,
)

__all__ = [
    "CACHE_VERSION",
    "COHEN_FINDINGS",
    "MANIFEST_COLUMNS",
    "NEAR_DUPLICATE_THRESHOLD",
    "MIN_SIDE",
    "DecodedImage",
    "PreparedDataset",
    "Recipe",
    "SourceTable",
    "canonical_order",
    "cohen_label",
    "decode_gray",
    "default_recipes",
    "excluded_images",
    "get_recipe",
    "list_datasets",
    "list_recipes",
    "load_dataset",
    "manifest_hash",
    "patients_at_several_sites",
    "prepare_recipes",
    "prepare_table",
    "read_cohen",
    "read_csv_manifest",
    "read_folder",
    "read_kermany",
    "read_nih",
    "register_recipe",
    "resize_square",
    "row_order_digest",
    "save_npy_atomic",
    "scan_images",
    "site_groups",
    "thumbnail",
    "thumbnail_pairs",
]
