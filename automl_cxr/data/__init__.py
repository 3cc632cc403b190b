"""Data layer: public sources → recipes/manifests → decoded image cache."""

from __future__ import annotations

from automl_cxr.data._dataset import (
    CACHE_VERSION,
    PreparedDataset,
    canonical_order,
    list_datasets,
    load_dataset,
    mapped_copy_on_write,
    row_order_digest,
    save_npy_atomic,
    save_npy_rows_atomic,
)
from automl_cxr.data._diagnostics import (
    ALIGNMENT_WARN_AT,
    age_by_class,
    site_label_table,
    source_label_alignment,
)
from automl_cxr.data._dupcache import features_of_files
from automl_cxr.data._duplicates import COPY_INLIERS, MATCH_INLIERS, Match, find_matches
from automl_cxr.data._external import external_overlap, map_labels, read_external
from automl_cxr.data._folders import read_csv_manifest, read_folder
from automl_cxr.data._image import MIN_SIDE, DecodedImage, decode_gray, resize_square
from automl_cxr.data._keypoints import LocalFeatures, extract_features
from automl_cxr.data._overlap import describe_overlap, overlap_pairs, overlap_to_drop
from automl_cxr.data._prepare import (
    MANIFEST_COLUMNS,
    default_recipes,
    excluded_images,
    manifest_hash,
    patients_at_several_sites,
    prepare_recipes,
    prepare_table,
    site_groups,
)
from automl_cxr.data._recipes import Recipe, get_recipe, list_recipes, register_recipe
from automl_cxr.data._scan import scan_images, scan_pool
from automl_cxr.data._sources import (
    COHEN_FINDINGS,
    SourceTable,
    cohen_label,
    read_cohen,
    read_kermany,
    read_nih,
)

__all__ = [
    "scan_pool",
    "ALIGNMENT_WARN_AT",
    "age_by_class",
    "site_label_table",
    "source_label_alignment",
    "COPY_INLIERS",
    "MATCH_INLIERS",
    "LocalFeatures",
    "Match",
    "describe_overlap",
    "extract_features",
    "features_of_files",
    "find_matches",
    "overlap_pairs",
    "overlap_to_drop",
    "CACHE_VERSION",
    "COHEN_FINDINGS",
    "MANIFEST_COLUMNS",
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
    "read_external",
    "map_labels",
    "external_overlap",
    "read_folder",
    "read_kermany",
    "read_nih",
    "register_recipe",
    "resize_square",
    "row_order_digest",
    "mapped_copy_on_write",
    "save_npy_atomic",
    "save_npy_rows_atomic",
    "scan_images",
    "site_groups",
]
