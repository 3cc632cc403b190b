"""A study is one experiment: its protocol is stored and checked on resume, metrics are checked
before any work, site-held-out folds hold out sites, and external sets are scored without the
search ever seeing them (issues 12 §3–4 and 13 items 7, 8, 10)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from automl_cxr.data import load_dataset
from automl_cxr.engine import members_hash, row_identities
from automl_cxr.errors import ConfigError, StorageError
from automl_cxr.study import SearchSettings, get_profile, load_space, load_study, run_search
from automl_cxr.study._objective import Objective, subsample
from automl_cxr.study._setup import pruning_budget


def _settings(prepared_dir: Path, db: Path, **kw) -> SearchSettings:
    base = dict(dataset="three_class", trials=1, data_dir=prepared_dir, storage=str(db))
    base.update(kw)
    base.setdefault("profile", "smoke")
    return SearchSettings(**base)


def test_resume_with_another_protocol_is_refused_naming_each_field(
    smoke_study: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "s.db"
    db.write_bytes(smoke_study.read_bytes())  # a copy: the session study stays read-only
    study = load_study(str(db))
    proto = study.user_attrs["protocol"]
    assert proto["seed"] == 0 and proto["cv"] == "patient" and proto["profile"] == "smoke"
    assert len(proto["folds"]) == 2 and all("val_hash" in f for f in proto["folds"])
    n = len(study.trials)
    with pytest.raises(StorageError) as exc:
        run_search(_settings(prepared_dir, db, trials=n + 1, seed=3))
    msg = str(exc.value)
    assert "seed: the study has 0, this run 3 (pass --seed 0)" in msg
    assert "--study-name" in msg
    with pytest.raises(StorageError, match="cv: the study has 'patient', this run 'site'"):
        run_search(_settings(prepared_dir, db, dataset="binary_adult", trials=n + 1, cv="site",
                             study_name=study.study_name))  # fmt: skip
    assert len(load_study(str(db)).trials) == n  # nothing was added


def test_resume_compares_space_sampler_pruner_device_precision_and_versions(
    smoke_study: Path, prepared_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Fields added by issue 24 §5: each differing one is named, nothing is added. Fails on the
    previous code (a resume with another sampler, pruner, space or torch version ran)."""
    db = tmp_path / "s.db"
    db.write_bytes(smoke_study.read_bytes())
    study = load_study(str(db))
    proto, n = study.user_attrs["protocol"], len(study.trials)
    assert proto["sampler"] == "tpe" and proto["pruner"] == "hyperband"
    assert proto["device"] == "cpu" and proto["precision"] in ("fp32", "bf16")
    assert len(proto["space_hash"]) == 64 and set(proto["versions"]) == {
        "automl_cxr",
        "torch",
        "timm",
    }
    space = tmp_path / "other.yaml"
    space.write_text("lr: {low: 1.0e-4, high: 1.0e-3, log: true}\n")
    with pytest.raises(StorageError) as exc:
        run_search(
            _settings(prepared_dir, db, trials=n + 1, sampler="random", pruner="none", space=space)
        )
    msg = str(exc.value)
    assert "sampler: the study has 'tpe', this run 'random' (pass --sampler tpe)" in msg
    assert "pruner: the study has 'hyperband', this run 'none' (pass --pruner hyperband)" in msg
    assert "space: the study searched a space with content hash" in msg
    import automl_cxr.study._protocol as protocol

    real = protocol.package_versions()
    monkeypatch.setattr(
        protocol, "package_versions", lambda: {**real, "torch": "1.0.0"}, raising=True
    )
    with pytest.raises(StorageError, match=re.escape(f"torch {real['torch']} → 1.0.0")):
        run_search(_settings(prepared_dir, db, trials=n + 1))
    assert len(load_study(str(db)).trials) == n


def test_a_study_whose_settings_were_cut_short_gets_them_all(
    prepared_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A crash while the study's settings are stored (here at `objectives`) leaves no `dataset`
    marker, which is written last: the next run stores every attribute, protocol included.
    On the previous code the marker came first and the next run refused the study
    ("optimises None")."""
    db = tmp_path / "cut.db"
    real = optuna.study.Study.set_user_attr

    def crash(self, key, value):
        if key == "objectives":
            raise KeyboardInterrupt
        real(self, key, value)

    monkeypatch.setattr(optuna.study.Study, "set_user_attr", crash)
    with pytest.raises(KeyboardInterrupt):
        run_search(_settings(prepared_dir, db, trials=1))
    assert "dataset" not in load_study(str(db)).user_attrs
    monkeypatch.setattr(optuna.study.Study, "set_user_attr", real)
    run_search(_settings(prepared_dir, db, trials=1))
    attrs = load_study(str(db)).user_attrs
    assert attrs["dataset"] == "three_class" and attrs["objectives"] == ["balanced_accuracy"]
    assert attrs["protocol"]["sampler"] == "tpe"


def test_bad_metric_is_refused_before_any_work(prepared_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    caches = {p for p in prepared_dir.rglob("*.npy")}
    with pytest.raises(ConfigError) as exc:
        run_search(_settings(prepared_dir, db, metric="sensitivity_covdi"))
    msg = str(exc.value)
    assert "sensitivity_covdi" in msg and "sensitivity_covid" in msg
    assert not db.exists()  # no study row written
    assert {p for p in prepared_dir.rglob("*.npy")} == caches  # nothing decoded
    # A class the dataset does not have is refused too, one it has is fine.
    with pytest.raises(ConfigError, match="sensitivity_viral"):
        run_search(_settings(prepared_dir, db, metric="sensitivity_viral"))
    assert not db.exists()


def test_pruning_budget_counts_searched_epochs_and_holdout(tmp_path: Path) -> None:
    smoke = get_profile("smoke")  # 2 epochs, 2 folds
    space = load_space(None)
    assert pruning_budget(smoke, space) == 4
    f = tmp_path / "e.yaml"
    f.write_text("epochs: {low: 2, high: 9}\n")
    assert pruning_budget(smoke, load_space(f)) == 18
    f.write_text("epochs: [3, 12, 6]\n")
    assert pruning_budget(smoke, load_space(f)) == 24
    demo = get_profile("demo")
    one_fold = 1 if demo.holdout is not None else (demo.max_folds or demo.n_folds)
    assert pruning_budget(demo, space) == demo.epochs * one_fold
    assert pruning_budget(smoke, space, n_folds=1) == 2  # e.g. a holdout split


def test_site_cv_holds_out_whole_sites_in_the_folds_trials_used(
    prepared_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "site.db"
    run_search(_settings(prepared_dir, db, dataset="binary_adult", trials=2, cv="site"))
    study = load_study(str(db))
    assert study.user_attrs["cv"] == "site"
    full = load_dataset("binary_adult", prepared_dir)
    ds = subsample(full, get_profile("smoke").max_per_class, 0)
    ids = row_identities(ds)
    sites = ds.manifest["site"].astype(str).to_numpy()
    groups = ds.groups
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done
    for t in done:
        for rec in t.user_attrs["metrics"]["splits"]:
            val = np.array(rec["val_indices"])
            train = np.setdiff1d(np.arange(len(ds)), val)
            # the complement is what the trial trained on (same members' hash)
            assert members_hash(ids, train) == rec["train_hash"]
            assert members_hash(ids, val) == rec["val_hash"]
            assert not set(sites[train]) & set(sites[val]), "a site on both sides"
            assert not set(groups[train]) & set(groups[val]), "a patient on both sides"
            assert rec["cv"] == "site" and rec["val_sites"] == sorted(set(sites[val]))


def _external_folder(shared: Path, prepared_dir: Path, root: Path) -> Path:
    """Adult radiographs three_class never saw: NIH 'No Finding' films (a hospital outside the
    recipe) and COVID-19 films of Cohen patients the recipe did not sample."""
    used = set(load_dataset("three_class", prepared_dir).manifest["path"])
    nih = pd.read_csv(shared / "nih" / "Data_Entry_2017_v2020.csv")
    (root / "NORMAL").mkdir(parents=True)
    (root / "covid").mkdir()
    for f in nih.loc[nih["Finding Labels"] == "No Finding", "Image Index"].head(8):
        os.symlink(shared / "nih" / "images" / f, root / "NORMAL" / f)
    meta = pd.read_csv(shared / "cohen" / "metadata.csv", dtype=str, keep_default_na=False)
    covid = meta[meta["finding"].str.startswith("COVID-19") & meta["view"].isin(["PA", "AP"])]
    k = 0
    for f in covid["filename"]:
        p = (shared / "cohen" / "images" / f).resolve()
        if p.is_file() and str(p) not in used and k < 8:
            os.symlink(p, root / "covid" / f)
            k += 1
    return root


def test_external_sets_are_scored_but_never_seen_by_the_search(
    shared_data: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    ext = _external_folder(shared_data, prepared_dir, tmp_path / "adults")
    with_ext, without = tmp_path / "with.db", tmp_path / "without.db"
    run_search(
        _settings(prepared_dir, with_ext, trials=2, externals=[str(ext)],
                  external_label_map={"NORMAL": "normal"})
    )  # fmt: skip
    run_search(_settings(prepared_dir, without, trials=2))
    a, b = load_study(str(with_ext)), load_study(str(without))
    assert a.user_attrs["external_sets"]["adults"]["classes"] == {"covid": 8, "normal": 8}
    for ta, tb in zip(a.trials, b.trials, strict=True):
        # The sampler and pruner saw the same thing: same draws, same values, same reports.
        assert ta.params == tb.params
        assert ta.values == tb.values
        assert ta.intermediate_values == tb.intermediate_values
        assert not any(k.startswith("external_") for k in tb.user_attrs)
        if ta.state == optuna.trial.TrialState.COMPLETE:
            rec = ta.user_attrs["externals"]["adults"]
            assert rec["n"] == 16
            assert ta.user_attrs["external_adults_balanced_accuracy"] == pytest.approx(
                rec["metrics"]["balanced_accuracy"]
            )
            assert 0.0 <= ta.user_attrs["external_adults_covid_specificity"] <= 1.0
            ci = rec["bootstrap"]["metrics"]["balanced_accuracy"]
            assert ci["ci_low"] <= rec["metrics"]["balanced_accuracy"] <= ci["ci_high"]


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_pruned_trials_carry_no_external_figures(
    shared_data: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    from automl_cxr.study import prepare_externals

    ext_dir = _external_folder(shared_data, prepared_dir, tmp_path / "adults")
    ds = subsample(load_dataset("three_class", prepared_dir), 40, 0)
    externals = prepare_externals(
        [ext_dir], dataset=ds, data_dir=tmp_path / "d", label_map={"NORMAL": "normal"}
    )
    objective = Objective(ds, load_space(None), get_profile("smoke"), externals=externals, seed=0)
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    study.optimize(objective, n_trials=1)
    (t,) = study.trials
    assert t.state == optuna.trial.TrialState.PRUNED
    assert not any(k.startswith("external") for k in t.user_attrs)


def test_an_external_set_that_shares_images_is_refused(prepared_dir: Path, tmp_path: Path) -> None:
    from automl_cxr.errors import DataError

    ds = load_dataset("three_class", prepared_dir)
    root = tmp_path / "leaky"
    for label in ("covid", "normal"):
        (root / label).mkdir(parents=True)
        for p in ds.manifest.loc[ds.manifest["label"] == label, "path"].head(3):
            os.symlink(p, root / label / Path(p).name)
    with pytest.raises(DataError, match="byte-identical"):
        run_search(_settings(prepared_dir, tmp_path / "x.db", externals=[str(root)]))
    assert not (tmp_path / "x.db").exists()
