"""`export` with temperature scaling and an operating point fitted on the exported model's own
predictions on a calibration holdout (cross-fitted figures on the card), Caruana ensemble
selection on the smoke study's stored out-of-fold predictions; `predict` and `evaluate` apply
the operating point. Real shared X-rays, tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from automl_cxr.cli import main
from automl_cxr.data import load_dataset, read_cohen
from automl_cxr.deploy import ExportedModel, load_image, load_study, predict_images, select_trial
from automl_cxr.deploy._clinic import CHANCE_MARGIN, calibration_holdout, holdout_decisions
from automl_cxr.deploy._commands import open_trial
from automl_cxr.deploy._graphs import TemperatureScaled
from automl_cxr.deploy._select import training_data
from automl_cxr.models import WeightedEnsemble
from automl_cxr.oof import (
    apply_temperature,
    caruana_select,
    choose_threshold,
    crossfit_operating_point,
    crossfit_parts,
    crossfit_temperature,
    decide,
    ece,
    fit_temperature,
    load_oof,
    load_study_oof,
    metric_scorer,
)


def _export(smoke_study: Path, prepared_dir: Path, out: Path, *extra: str) -> dict:
    args = ["export", "--study", str(smoke_study), "--out", str(out)]
    args += ["--data-dir", str(prepared_dir), "--quiet", "--json", *extra]
    assert main(args) == 0
    return json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module")
def with_point(smoke_study: Path, prepared_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clinic") / "op"
    _export(smoke_study, prepared_dir, out, "--operating-point", "sensitivity=0.9")
    return out


@pytest.fixture(scope="module")
def images(shared_data: Path) -> list[Path]:
    cohen = sorted((shared_data / "cohen" / "images").glob("*.jp*g"))[:3]
    normal = sorted((shared_data / "kermany" / "chest_xray" / "test" / "NORMAL").glob("*"))[:3]
    return cohen + normal


def test_temperature_and_threshold_come_from_the_exported_model_on_its_holdout(
    smoke_study: Path, prepared_dir: Path, with_point: Path, capsys
) -> None:
    """Issue 24 §2: the temperature and the threshold are fitted on the exported model's own
    predictions on patients it never trained on, and the card's figures are cross-fitted
    within them. The previous code fitted both on the fold models' pooled out-of-fold
    predictions and scored them in-sample, and wrote no `calibration_holdout`."""
    capsys.readouterr()
    cfg = json.loads((with_point / "config.json").read_text())
    card = json.loads((with_point / "model_card.json").read_text())
    spec = open_trial(smoke_study)
    ds = training_data(spec, prepared_dir)
    fit_rows, cal_rows = calibration_holdout(ds, spec.seed)
    assert not set(ds.groups[fit_rows]) & set(ds.groups[cal_rows])  # whole patients
    hold = cfg["calibration_holdout"]
    assert hold["images"] == len(cal_rows) and hold["trained_on"] == len(fit_rows)
    assert cfg["training_data"]["images"] == len(fit_rows)
    listed = set((with_point / "training_images.sha256").read_text().split())
    assert listed == set(ds.manifest["sha256"])  # holdout images listed as seen
    # the holdout through the exported graph, as `predict` feeds it, without its temperature
    m = ExportedModel(with_point, runtime="pytorch")
    net = m.torch_model()
    c = card["calibration"]
    applied = c["applied"]
    assert isinstance(net, TemperatureScaled) == applied
    inner_net = net.model if applied else net
    paths = ds.manifest["path"].to_numpy()[cal_rows]
    x = torch.from_numpy(np.stack([load_image(p, m.resolution).tensor for p in paths]))
    with torch.no_grad():
        raw = torch.softmax(inner_net(x), 1).numpy().astype(np.float64)
    raw /= raw.sum(axis=1, keepdims=True)
    labels, groups = ds.labels[cal_rows], ds.groups[cal_rows]
    t = fit_temperature(raw, labels)["temperature"]
    assert c["temperature"] == pytest.approx(t, rel=1e-3)
    assert "calibration holdout" in c["fitted_on"] and c["before"]["n"] == len(cal_rows)
    assert c["before"]["ece"] == pytest.approx(ece(raw, labels), abs=1e-3)
    parts, _ = crossfit_parts(labels, groups, seed=spec.seed)
    cf = crossfit_temperature(raw, labels, groups, parts, n_boot=50)
    assert c["after"]["ece"] == pytest.approx(cf["after"]["ece"], abs=1e-3)
    assert c["after_in_sample"]["ece"] == pytest.approx(cf["in_sample_after"]["ece"], abs=1e-3)
    # baked in exactly when it lowers the held-out (cross-fitted) NLL
    assert applied == (cf["after"]["nll"] <= cf["before"]["nll"] + 1e-9)
    assert (cfg["calibration"] or {}).get("temperature") == (
        pytest.approx(t, rel=1e-3) if applied else None
    )
    k = cfg["classes"].index("covid")
    op = cfg["operating_point"]
    assert op["positive"] == "covid" and op["rule"] == "sensitivity" and op["target"] == 0.9
    cal = apply_temperature(raw, t) if applied else raw
    pos = labels == k
    assert np.mean(cal[pos, k] >= op["threshold"] - 1e-6) >= 0.9  # in-sample: met by design
    want = crossfit_operating_point(
        raw, labels, k, "sensitivity", 0.9, groups, parts, temperature=applied, n_boot=50
    )
    assert card["operating_point"]["sensitivity"] == pytest.approx(want["sensitivity"])
    assert card["operating_point"]["specificity"] == pytest.approx(want["specificity"])
    md = (with_point / "model_card.md").read_text()
    assert "## Calibration" in md and "## Operating point" in md
    hd = card["holdout_decisions"]  # the retrained model's own decisions on the holdout
    assert hd["n"] == len(cal_rows)
    assert hd["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, raw.argmax(1)))
    assert "Decisions on the" in md
    assert "after, cross-fitted" in md and "after, in-sample" in md and "(cross-fitted)" in md
    # what the graphs compute: every runtime = softmax(inner logits [/ T])
    xr = torch.rand(2, 1, m.resolution, m.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inner = torch.softmax(inner_net(xr) / (t if applied else 1.0), 1).numpy()
    for runtime in ("torchscript", "onnx", "pytorch"):
        got = ExportedModel(with_point, runtime=runtime).predict_proba(xr.numpy())
        assert np.allclose(got, inner, atol=1e-3)


def test_a_degenerate_retrain_is_reported_from_its_holdout_decisions() -> None:
    """A retrain that calls (almost) every holdout image one class scores at chance and gets a
    warning naming the class and what to do; a useful model and a one-class holdout do not."""
    classes = ["covid", "non_covid"]
    labels = np.array([0] * 30 + [1] * 50)
    rng = np.random.default_rng(0)
    collapsed = np.tile([0.9, 0.1], (80, 1))
    collapsed[-1] = [0.2, 0.8]  # one non-COVID image called right: 0.51 > chance + 0.01
    info, warning = holdout_decisions(collapsed, labels, classes)
    assert info["predicted_share"]["covid"] == pytest.approx(79 / 80)
    assert info["balanced_accuracy"] < 0.5 + CHANCE_MARGIN
    assert warning and "'covid'" in warning and "--ensemble" in warning and "99%" in warning
    good = np.eye(2)[labels] * 0.6 + rng.random((80, 2)) * 0.4
    info, warning = holdout_decisions(good, labels, classes)
    assert warning is None and info["balanced_accuracy"] > 0.9
    info, warning = holdout_decisions(collapsed[:30], labels[:30], classes)  # one class held
    assert warning is None and np.isnan(info["balanced_accuracy"])


def test_a_retrain_with_early_stopping_stops_on_an_inner_split_by_default(
    smoke_study: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    """A trial trained with early stopping is retrained for export as each of its folds was
    (an inner split of the patients stops it; the card says so), or with `stop="cv_epochs"`
    on every image for the recorded median epoch count."""
    import dataclasses

    from automl_cxr.deploy._export import export_trial, train_for_export

    spec = open_trial(smoke_study)
    spec = dataclasses.replace(
        spec,
        train=dataclasses.replace(spec.train, early_stopping=1, epochs=3),
        user_attrs={**spec.user_attrs, "full_fit_epochs": 2},
    )
    ds = training_data(spec, prepared_dir)
    model, _ = train_for_export(spec, ds)
    info = model.training_info
    assert info["epochs_from"] == "inner_early_stopping" and 1 <= info["epochs"] <= 3
    assert info["n_trained_images"] == len(ds) - info["inner_holdout_images"] < len(ds)
    export_trial(spec, ds, tmp_path / "m", model=model)
    card = json.loads((tmp_path / "m" / "model_card.json").read_text())
    assert card["training"]["epochs"]["from"] == "inner_early_stopping"
    assert "inner split of the patients" in card["training"]["epochs"]["why"]
    held = info["inner_holdout_images"]
    assert (
        f"({held} of them, whole patients, held out to stop it)" in card["training"]["retrained_on"]
    )
    assert card["metrics"]["protocol"].startswith("patient-grouped")
    # a site-CV study's card names its protocol and how a one-class fold is scored
    from automl_cxr.deploy._card import build_card

    site = dataclasses.replace(spec, train=dataclasses.replace(spec.train, cv="site"))
    site_card = build_card(site, ds)
    assert site_card["metrics"]["protocol"].startswith("site-held-out")
    assert "one class only" in site_card["metrics"]["protocol"]
    assert "hospitals of the study's own sources" in site_card["limitations"][0]
    assert "patient-grouped" not in json.dumps(site_card)
    # the search's external figure is labelled as its fold models', not the exported model's
    ext = {"name": "held_out_sites", "metrics": {"balanced_accuracy": 0.61}}
    attrs = {**spec.user_attrs, "metrics": {**spec.metrics, "external": ext}}
    labelled = build_card(dataclasses.replace(site, user_attrs=attrs), ds)["metrics"]["external"]
    assert labelled["metrics"] == ext["metrics"] and "not this exported model" in labelled["object"]
    assert build_card(site, ds)["metrics"]["external"] is None
    fixed, _ = train_for_export(spec, ds, stop="cv_epochs")
    assert fixed.training_info["epochs_from"] == "argument"
    assert fixed.training_info["epochs"] == 2 and fixed.training_info["n_trained_images"] == len(ds)


def test_export_refuses_an_unknown_retrain_stop_before_any_work(
    smoke_study: Path, prepared_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "never"
    args = ["export", "--study", str(smoke_study), "--out", str(out), "--data-dir"]
    assert main([*args, str(prepared_dir), "--retrain-stop", "halt"]) == 2
    err = capsys.readouterr().err
    assert "'halt'" in err and "inner" in err and "cv_epochs" in err and "Traceback" not in err
    assert not out.exists()


def test_crossfitted_figures_are_fitted_on_other_parts(oof_valid) -> None:
    """Each part's temperature and threshold come from the other parts only: recomputed by
    hand on a stored out-of-fold table."""
    v = oof_valid
    k = v.classes.index("covid")
    parts, how = crossfit_parts(v.labels, v.groups, v.folds)
    assert how == "validation folds" and len(np.unique(parts)) == 2
    cf = crossfit_temperature(v.probs, v.labels, v.groups, parts, n_boot=50)
    op = crossfit_operating_point(v.probs, v.labels, k, "youden", None, v.groups, parts)
    called = np.zeros(len(v.labels), dtype=bool)
    for rec, orec in zip(cf["per_part"], op["per_part"], strict=True):
        other, held = parts != rec["part"], parts == rec["part"]
        t = fit_temperature(v.probs[other], v.labels[other])["temperature"]
        assert rec["temperature"] == pytest.approx(t)
        assert np.allclose(cf["calibrated"][held], apply_temperature(v.probs[held], t))
        thr = choose_threshold(v.probs[other, k], v.labels[other] == k, "youden", None)
        assert orec["threshold"] == pytest.approx(thr)
        called[held] = v.probs[held, k] >= thr
    pos = v.labels == k
    assert op["sensitivity"] == pytest.approx(called[pos].mean())
    assert op["specificity"] == pytest.approx((~called[~pos]).mean())
    # one fold only (a holdout): stratified patient parts instead, whole patients each
    parts1, how1 = crossfit_parts(v.labels, v.groups, np.zeros(len(v.labels), dtype=int))
    assert "patient parts" in how1
    for p in np.unique(parts1):
        assert not set(v.groups[parts1 == p]) & set(v.groups[parts1 != p])


@pytest.fixture(scope="module")
def oof_valid(smoke_study: Path):
    study = load_study(smoke_study)
    return load_oof(select_trial(study, "best"), smoke_study, required=True).valid()


def test_predict_reports_argmax_and_thresholded(with_point: Path, images: list[Path]) -> None:
    m = ExportedModel(with_point)
    res = predict_images(m, images)
    probs = m.predict_proba(np.stack([load_image(p, m.resolution).tensor for p in images]))
    k = m.classes.index("covid")
    want = decide(probs, k, m.operating_point["threshold"])
    for r, p, d in zip(res, probs, want, strict=True):
        assert r["predicted"] == m.classes[int(np.argmax(p))]
        assert r["thresholded"] == m.classes[int(d)]
        assert r["operating_point"]["threshold"] == m.operating_point["threshold"]


@pytest.fixture(scope="module")
def external_dir(tmp_path_factory, shared_data: Path, prepared_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("external-op") / "ext"
    used = set(load_dataset("three_class", prepared_dir).manifest["path"])
    cohen = read_cohen(shared_data / "cohen").table
    covid = [p for p in cohen[cohen["label"] == "covid"]["path"] if p not in used][:5]
    normal = sorted((shared_data / "kermany" / "chest_xray" / "test" / "NORMAL").glob("*"))[:5]
    for cls, paths in (("covid", covid), ("NORMAL", normal)):
        (root / cls).mkdir(parents=True)
        for p in paths:
            os.symlink(p, root / cls / Path(p).name)
    return root


def test_evaluate_applies_the_operating_point(with_point: Path, external_dir: Path, capsys) -> None:
    args = ["evaluate", "--data", str(external_dir), "--label-map", "NORMAL=normal"]
    assert main([*args, "--model", str(with_point), "--json", "--n-boot", "100"]) == 0
    res = json.loads(capsys.readouterr().out)
    op = res["operating_point"]
    m = ExportedModel(with_point)
    paths = sorted(p for p in external_dir.rglob("*") if p.is_file())
    probs = m.predict_proba(np.stack([load_image(p, m.resolution).tensor for p in paths]))
    labels = np.array(
        [m.classes.index("covid" if p.parent.name == "covid" else "normal") for p in paths]
    )
    dec = decide(probs, m.classes.index("covid"), op["threshold"])
    sens = np.mean(dec[labels == 0] == 0)
    assert op["metrics"]["covid_sensitivity"] == pytest.approx(sens)
    assert res["metrics"]["covid_sensitivity"] == pytest.approx(
        np.mean(probs[labels == 0].argmax(1) == 0)
    )
    assert main([*args, "--model", str(with_point)]) == 0
    assert "at the model's operating point" in capsys.readouterr().out


def test_export_ensemble_select_writes_the_selected_weights(
    smoke_study: Path, prepared_dir: Path, tmp_path: Path, images: list[Path]
) -> None:
    cfg = _export(smoke_study, prepared_dir, tmp_path / "ens", "--ensemble-select", "4")
    study = load_study(smoke_study)
    oofs = {n: o.valid() for n, o in load_study_oof(study, smoke_study).items()}
    first = next(iter(oofs.values()))
    sel = caruana_select(
        {n: o.probs for n, o in oofs.items()},
        first.labels,
        first.folds,
        metric_scorer("balanced_accuracy", first.classes, "covid"),
        n_rounds=4,
    )
    members = cfg["selected_ensemble"]["members"]
    assert {m["trial"]: m["weight"] for m in members} == pytest.approx(sel["weights"])
    card = json.loads((tmp_path / "ens" / "model_card.json").read_text())
    assert card["selected_ensemble"]["score"] >= card["selected_ensemble"]["best_single_score"]
    assert "optimistic" in card["selected_ensemble"]["caveat"]
    net = ExportedModel(tmp_path / "ens", runtime="pytorch").torch_model()
    inner = net.model if isinstance(net, TemperatureScaled) else net
    assert isinstance(inner, WeightedEnsemble) and len(inner) == len(members)
    # the graph averages the members' probabilities with the selected weights
    x = np.stack([load_image(p, cfg["resolution"]).tensor for p in images])
    with torch.no_grad():
        mix = sum(
            w * torch.softmax(m(torch.from_numpy(x)), 1)
            for w, m in zip(inner.weights, inner.members, strict=True)
        )
        t = float(net.temperature) if isinstance(net, TemperatureScaled) else 1.0
        want = torch.softmax(torch.log(mix) / t, 1).numpy()
    got = ExportedModel(tmp_path / "ens").predict_proba(x)
    assert np.allclose(got, want, atol=1e-4)
    res = predict_images(
        ExportedModel(tmp_path / "ens", runtime="pytorch"),
        images[:1],
        explain=True,
        out_dir=tmp_path / "gc",
    )
    assert Path(res[0]["gradcam"]).is_file()


def test_ensemble_select_members_share_the_exported_trials_levers(
    smoke_study: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    """One graph feeds every member the same input: a trial searched with other roi/intensity
    levers (here a trial of the study rewritten as a lung_mask one, as a `robust` study holds
    them) is left out of the selection, and the card says so."""
    import shutil
    import sqlite3

    db = tmp_path / "s.db"
    shutil.copy(smoke_study, db)
    shutil.copytree(smoke_study.with_suffix(".artifacts"), db.with_suffix(".artifacts"))
    study = load_study(db)
    best = study.best_trial.number
    other = next(t for t in study.trials if t.state.name == "COMPLETE" and t.number != best)
    cfg = other.user_attrs["config"]
    cfg["train"]["roi"] = "lung_mask"
    with sqlite3.connect(db) as con:
        (tid,) = con.execute(
            "SELECT trial_id FROM trials WHERE number = ?", (other.number,)
        ).fetchone()
        con.execute(
            "UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = 'config'",
            (json.dumps(cfg), tid),
        )
    out = _export(
        db, prepared_dir, tmp_path / "ens", "--ensemble-select", "4", "--trial", str(best)
    )
    members = [m["trial"] for m in out["selected_ensemble"]["members"]]
    assert members == [best]
    card = json.loads((tmp_path / "ens" / "model_card.json").read_text())
    assert (
        "1 trial(s) at another resolution or with other roi/intensity levers"
        in (card["selected_ensemble"]["excluded"])
    )
