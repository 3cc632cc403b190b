"""Lung segmentation and the de-confounding preprocessing levers: V7's outlines of Cohen
images → a small U-Net (`automl-cxr lungs train`) → `Preprocess` (`roi`: full | lung_crop |
lung_mask; `intensity`: none | equalize | clahe), cached per image and run identically in the
search, `evaluate`, `predict` and exported models."""

from __future__ import annotations

from automl_cxr._lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_SEGMENTER": "automl_cxr.lungs._cache",
    "STUDY_SEGMENTERS": "automl_cxr.lungs._cache",
    "study_segmenter": "automl_cxr.lungs._cache",
    "PreprocessedImages": "automl_cxr.lungs._cache",
    "preprocess_canvas": "automl_cxr.lungs._cache",
    "preprocess_for": "automl_cxr.lungs._cache",
    "preprocess_record": "automl_cxr.lungs._cache",
    "rebuild_preprocess": "automl_cxr.lungs._cache",
    "preprocessed_images": "automl_cxr.lungs._cache",
    "segmenter_path": "automl_cxr.lungs._cache",
    "clahe": "automl_cxr.lungs._intensity",
    "equalize": "automl_cxr.lungs._intensity",
    "INTENSITY_MODES": "automl_cxr.lungs._modes",
    "ROI_MODES": "automl_cxr.lungs._modes",
    "LungOutlines": "automl_cxr.lungs._outlines",
    "read_outlines": "automl_cxr.lungs._outlines",
    "CANVAS": "automl_cxr.lungs._preprocess",
    "Preprocess": "automl_cxr.lungs._preprocess",
    "PreprocessSpec": "automl_cxr.lungs._preprocess",
    "Preprocessed": "automl_cxr.lungs._preprocess",
    "quantise": "automl_cxr.lungs._preprocess",
    "SegmenterTraining": "automl_cxr.lungs._train",
    "dice_scores": "automl_cxr.lungs._train",
    "site_holdout": "automl_cxr.lungs._train",
    "train_segmenter": "automl_cxr.lungs._train",
    "SEGMENTER_FORMAT": "automl_cxr.lungs._unet",
    "LungUNet": "automl_cxr.lungs._unet",
    "Segmenter": "automl_cxr.lungs._unet",
    "load_segmenter": "automl_cxr.lungs._unet",
    "save_segmenter": "automl_cxr.lungs._unet",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
