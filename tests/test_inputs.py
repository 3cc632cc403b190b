"""Inputs that silently misled (issue 24 §5), on the real shared X-rays."""

from __future__ import annotations

from pathlib import Path

import pytest

from automl_cxr.data import load_dataset, prepare_table, read_csv_manifest


def test_blank_patient_ids_do_not_form_one_patient(shared_data: Path, tmp_path: Path) -> None:
    """Fails on the code before: every blank cell became the one patient `<name>:`."""
    imgs = sorted((shared_data / "nih" / "images").iterdir())[:6]
    lines = ["path,label,patient_id"]
    for i, p in enumerate(imgs):
        lines.append(f"{p},{'a' if i % 2 else 'b'},{'' if i < 4 else 'p9'}")
    csv = tmp_path / "mine.csv"
    csv.write_text("\n".join(lines) + "\n")
    table = read_csv_manifest(csv)
    assert table.notes and "4 row(s) have a blank patient_id" in table.notes[0]
    prepare_table(table, name="mine", data_dir=tmp_path / "data", kind="csv", origin=str(csv))
    ds = load_dataset("mine", tmp_path / "data")
    groups = ds.manifest.set_index("path")["group_id"]
    blank = [groups[str(p)] for p in imgs[:4]]
    assert len(set(blank)) == 4  # each its own patient
    assert groups[str(imgs[4])] == groups[str(imgs[5])]  # a given id still groups
    assert any("blank patient_id" in n for n in ds.meta.get("notes", []))


def test_nan_intermediate_value_is_not_reported_as_zero(
    prepared_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A fold whose metric is undefined (e.g. covid_sensitivity of a site fold holding only
    NIH's non-COVID films) reports nothing for its steps instead of 0.0 (which got such trials
    pruned), and the trial lists the unreported steps. Fold 0's values are made NaN here, as
    such a fold's are; fails on the code before (it reported 0.0)."""
    from optuna.trial import TrialState

    import automl_cxr.study._objective as objective
    from automl_cxr.study import SearchSettings, load_study, run_search

    real = objective.run_trial

    def fold0_undefined(*args, report=None, **kw):
        epochs = args[2].epochs

        def wrapped(step: int, value: float) -> None:
            report(step, float("nan") if step < epochs else value)

        return real(*args, report=wrapped, **kw)

    monkeypatch.setattr(objective, "run_trial", fold0_undefined)
    db = tmp_path / "nan.db"
    run_search(
        SearchSettings(
            dataset="binary_adult",
            trials=1,
            data_dir=prepared_dir,
            storage=str(db),
            profile="smoke",
            pruner="median",
            workers=1,
        )
    )
    (t,) = load_study(db).get_trials()
    assert t.state == TrialState.COMPLETE
    epochs = t.user_attrs["config"]["train"]["epochs"]
    assert t.user_attrs["unreported_steps"] == list(range(epochs))
    assert min(t.intermediate_values) == epochs  # fold 1's steps are reported as usual


def test_feature_cache_key_names_the_freeze_plan_and_package_version(prepared_dir, monkeypatch):
    """Features cached by another automl-cxr version, or cut at another stage boundary, are
    never read back (both were missing from the key before)."""
    import automl_cxr.engine._session as trial
    from automl_cxr.engine import TrainConfig
    from automl_cxr.models import ModelConfig, num_stages
    from automl_cxr.study import subsample

    ds = subsample(load_dataset("three_class", prepared_dir), 8, seed=0)
    n = num_stages("test_efficientnet")
    mc = ModelConfig(backbone="test_efficientnet", num_classes=3, pretrained=False, frozen_stages=n)
    s = trial.Session(ds, mc, TrainConfig(resolution=32, epochs=1), feature_cache=None, log=None)
    prefix = s.model.split_frozen()[0]
    key = s.feature_key_parts(n, prefix, mc)
    assert key["automl_cxr"] and key["plan"] != s.feature_key_parts(n - 1, prefix, mc)["plan"]
    monkeypatch.setattr(trial, "__version__", "9.9.9")
    assert s.feature_key_parts(n, prefix, mc) != key


def test_lung_blanked_control_uses_the_corrected_test_and_the_study_metric(
    smoke_study: Path, prepared_dir: Path, capsys
) -> None:
    """The control's paired comparison is over the same overlapping folds: corrected resampled
    t (it was the plain ttest_rel), on the study's metric (it was always balanced accuracy)."""
    import json

    from automl_cxr.cli import main

    base = ["diagnose", "--study", str(smoke_study), "--data-dir", str(prepared_dir)]
    assert main([*base, "--control", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)["control"]
    assert res["metric"] == "balanced_accuracy"  # the smoke study's objective
    assert res["paired"]["method"] == "corrected_t" and res["paired"]["test_train_ratio"] > 0
    assert all("balanced_accuracy" in v for v in res["control_by_source"].values())


def test_a_reencoded_training_image_is_refused_as_external(
    prepared_dir: Path, tmp_path: Path, shared_data: Path
) -> None:
    """A JPEG re-encode (and resize) of a training image passed the byte check before; the
    duplicate finder now refuses it, naming the pair."""
    from PIL import Image

    from automl_cxr.errors import DataError
    from automl_cxr.study import prepare_externals

    ds = load_dataset("binary_adult", prepared_dir)
    src = Path(ds.manifest["path"].iloc[3])
    # a child's film: no adult recipe holds it
    other = sorted((shared_data / "kermany" / "chest_xray" / "test" / "NORMAL").iterdir())[0]
    ext = tmp_path / "ext"
    (ext / "covid").mkdir(parents=True)
    (ext / "non_covid").mkdir()
    img = Image.open(src).convert("L")
    img.resize((img.width * 3 // 4, img.height * 3 // 4)).save(
        ext / "covid" / "copy.jpg", quality=70
    )
    Image.open(other).convert("L").save(ext / "non_covid" / "elsewhere.png")
    with pytest.raises(DataError, match=r"not external: 1 of its 2 images .* copy\.jpg ~ "):
        prepare_externals([ext], dataset=ds, data_dir=tmp_path / "data")
