"""Deployable models on the real shared data: choose a trial, export (TorchScript, ONNX, model
card), predict with Grad-CAM, evaluate on an external folder, and the error paths."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from automl_cxr.cli import main
from automl_cxr.data import decode_gray, load_dataset, map_labels, read_cohen
from automl_cxr.deploy import (
    ExportedModel,
    load_image,
    load_study,
    open_trial,
    select_trial,
    training_data,
)
from automl_cxr.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def exported(smoke_study: Path, prepared_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "best"
    rc = main(
        [
            "export",
            "--study",
            str(smoke_study),
            "--out",
            str(out),
            "--data-dir",
            str(prepared_dir),
            "--quiet",
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def real_images(shared_data: Path) -> list[Path]:
    cohen = sorted((shared_data / "cohen" / "images").glob("*.jp*g"))[:2]
    normal = sorted((shared_data / "kermany" / "chest_xray" / "test" / "NORMAL").glob("*"))[:2]
    return cohen + normal


# ----------------------------------------------------------------------------- choosing


def test_open_trial_rebuilds_config_and_data(smoke_study: Path, prepared_dir: Path) -> None:
    study = load_study(smoke_study)
    spec = open_trial(smoke_study)
    assert spec.number == study.best_trial.number
    assert spec.classes == ["covid", "bacterial", "normal"]
    assert spec.model.num_classes == 3 and spec.resolution == 64
    ds = training_data(spec, prepared_dir)
    assert ds.hash == spec.dataset_hash  # the profile's subsample, exactly
    assert len(ds) < len(load_dataset("three_class", prepared_dir))
    spec.dataset_hash = "0" * 64
    with pytest.raises(DataError, match="not the data study"):
        training_data(spec, prepared_dir)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_select_trial_numbers_states_and_pareto(smoke_study: Path, tmp_path: Path) -> None:
    db = tmp_path / "copy.db"
    shutil.copy(smoke_study, db)
    study = load_study(db)
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    with pytest.raises(ConfigError, match=rf"trial {failed.number} .* is FAIL, not COMPLETE"):
        select_trial(study, failed.number)
    with pytest.raises(ConfigError, match="no trial 99"):
        select_trial(study, "99")
    with pytest.raises(ConfigError, match="'best' or a trial number"):
        select_trial(study, "latest")
    assert select_trial(study, "0").number == 0

    multi = optuna.create_study(directions=["minimize", "maximize"])
    multi.set_user_attr("objectives", ["latency", "balanced_accuracy"])
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for lat, acc in ((1.0, 0.6), (3.0, 0.9), (2.0, 0.8), (4.0, 0.7)):
        multi.add_trial(
            optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, values=[lat, acc])
        )
    assert select_trial(multi, "best").values == [3.0, 0.9]  # best metric on the front


def test_label_map_errors() -> None:
    import pandas as pd

    t = pd.DataFrame({"label": ["NORMAL", "PNEUMONIA"], "path": ["a", "b"]})
    with pytest.raises(DataError, match=r"\['PNEUMONIA'\] are not classes.*allowed"):
        map_labels(t, {"NORMAL": "non_covid"}, ["covid", "non_covid"])
    with pytest.raises(ConfigError, match="not labels of the external set"):
        map_labels(t, {"VIRAL": "non_covid"}, ["covid", "non_covid"])
    ok = map_labels(t, {"NORMAL": "non_covid", "PNEUMONIA": "non_covid"}, ["covid", "non_covid"])
    assert ok["label"].tolist() == ["non_covid", "non_covid"]


# ----------------------------------------------------------------------------- export


def test_export_writes_models_and_card(
    exported: Path, smoke_study: Path, prepared_dir: Path
) -> None:
    names = {p.name for p in exported.iterdir()}
    assert {
        "model.ts",
        "model.onnx",
        "model.pt",
        "config.json",
        "model_card.md",
        "model_card.json",
    } <= names
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["classes"] == ["covid", "bacterial", "normal"] and cfg["resolution"] == 64
    assert cfg["input"]["shape"] == "(B, 1, R, R)" and cfg["input"]["range"] == "[0, 1]"
    assert cfg["checks"]["ok"], cfg["checks"]
    assert "note" not in cfg["checks"] and cfg["checks"]["onnx_max_prob_diff"] <= 1e-4
    card_md = (exported / "model_card.md").read_text()
    assert "research only, not a medical device" in card_md
    assert "| balanced_accuracy |" in card_md and "95% CI" in card_md
    assert "Shortcut risk" in card_md and "Cramér's V = 1.00" in card_md
    card = json.loads((exported / "model_card.json").read_text())
    trial = load_study(smoke_study).best_trial
    ba = card["metrics"]["cv"]["balanced_accuracy"]
    assert ba["mean"] == pytest.approx(trial.value)
    assert 0.0 <= ba["ci_low"] <= ba["mean"] <= ba["ci_high"] <= 1.0
    assert card["data"]["manifest_hash"] == load_dataset("three_class", prepared_dir).hash
    assert card["data"]["study_data_hash"] == trial.user_attrs["dataset_hash"]
    # calibrated by default: trained on all but the calibration holdout's patients
    hold = json.loads((exported / "config.json").read_text())["calibration_holdout"]
    from automl_cxr.deploy._commands import open_trial
    from automl_cxr.deploy._select import training_data

    n = len(training_data(open_trial(smoke_study), prepared_dir))
    assert card["data"]["images"] == hold["trained_on"] == n - hold["images"]
    assert card["data"]["recipe"]["name"] == "three_class"
    assert card["diagnostics"]["source_probe"]["auc"] >= 0.9
    assert "not a medical device" in card["intended_use"]
    # Trained for what cross-validation scored (smoke: fixed epochs, no early stopping).
    ep = card["training"]["epochs"]
    assert (
        ep["epochs"] == trial.user_attrs["full_fit_epochs"] == card["training"]["config"]["epochs"]
    )
    assert ep["from"] == "config" and f"trained for {ep['epochs']} epochs" in card_md
    # the card says how this model's sources line up with its classes (three_class: each
    # class from one collection, the others from Kermany's children)
    src = card["limitations"][1]
    assert "covid 100% from cohen" in src and "normal 100% from kermany" in src
    assert "children aged 1-5" in src
    assert f"resolution: {cfg['resolution']} x {cfg['resolution']}\n" in card_md  # no layer


def test_runtimes_match_pytorch_on_real_images(exported: Path, real_images: list[Path]) -> None:
    models = {rt: ExportedModel(exported, runtime=rt) for rt in ("pytorch", "torchscript", "onnx")}
    x = np.stack([load_image(p, 64).tensor for p in real_images])
    ref = models["pytorch"].logits(x)
    assert ref.shape == (len(real_images), 3)
    np.testing.assert_allclose(models["torchscript"].logits(x), ref, atol=1e-4)
    np.testing.assert_allclose(models["onnx"].logits(x), ref, atol=1e-4)
    np.testing.assert_allclose(models["onnx"].logits(x[:1]), ref[:1], atol=1e-4)  # free batch


def test_predict_cli_probabilities_and_gradcam(
    exported: Path, real_images: list[Path], tmp_path: Path, capsys
) -> None:
    gc = tmp_path / "gc"
    args = ["predict", str(exported), *map(str, real_images[1:3])]
    assert main([*args, "--explain", "--out", str(gc)]) == 0
    out = capsys.readouterr().out
    assert "covid" in out and "bacterial" in out and "predicted" in out
    for img in real_images[1:3]:
        png = gc / f"{img.stem}_gradcam.png"
        assert png.is_file()
        heat = Image.open(png)
        orig = decode_gray(img).pixels
        assert heat.size == (orig.shape[1], orig.shape[0]) and heat.mode == "RGB"
        assert np.asarray(heat).std() > 0
    assert main([*args, "--runtime", "onnx", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for r in res["predictions"]:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] in res["classes"] and r["gradcam"] is None


def test_export_fold_ensemble_round_trip(
    smoke_study: Path, prepared_dir: Path, real_images: list[Path], tmp_path: Path, capsys
) -> None:
    """`export --ensemble` keeps the trial's fold models: the same folds as the search (each
    member scores what the trial scored on its fold), one graph averaging their
    probabilities, identical in PyTorch, TorchScript and ONNX; Grad-CAM works on it."""
    out = tmp_path / "ens"
    args = ["export", "--study", str(smoke_study), "--out", str(out), "--ensemble"]
    args.append("--no-calibrate")  # the plain average (temperature: tests/test_export_clinic.py)
    assert main([*args, "--data-dir", str(prepared_dir), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    trial = load_study(smoke_study).best_trial
    folds = trial.user_attrs["metrics"]["folds"]
    assert res["ensemble"]["members"] == len(folds) == 2 and res["checks"]["ok"]
    card = json.loads((out / "model_card.json").read_text())
    members = card["training"]["ensemble"]
    assert [m["n_val"] for m in members] == [
        s["n_val"] for s in trial.user_attrs["metrics"]["splits"]
    ]
    for m, f in zip(members, folds, strict=True):
        assert m["balanced_accuracy"] == pytest.approx(f["balanced_accuracy"], abs=0.05)
    assert "fold ensemble: 2 models" in (out / "model_card.md").read_text()

    models = {rt: ExportedModel(out, runtime=rt) for rt in ("pytorch", "torchscript", "onnx")}
    x = np.stack([load_image(p, 64).tensor for p in real_images])
    net = models["pytorch"].torch_model()
    assert len(net.members) == 2
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(torch.from_numpy(x)), 1) for m in net.members]).mean(0)
    probs = models["pytorch"].predict_proba(x)
    np.testing.assert_allclose(probs, mean.numpy(), atol=1e-5)
    assert not np.allclose(probs, torch.softmax(net.members[0](torch.from_numpy(x)), 1).detach())
    for rt in ("torchscript", "onnx"):
        np.testing.assert_allclose(models[rt].predict_proba(x), probs, atol=1e-4)

    gc = tmp_path / "gc"
    assert main(["predict", str(out), str(real_images[0]), "--explain", "--out", str(gc)]) == 0
    png = gc / f"{real_images[0].stem}_gradcam.png"
    orig = decode_gray(real_images[0]).pixels
    assert Image.open(png).size == (orig.shape[1], orig.shape[0])


# ----------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def external_dir(tmp_path_factory, shared_data: Path, prepared_dir: Path) -> Path:
    """COVID-19 images the three_class recipe left out + Kermany test normals (folder NORMAL),
    linked (not copied) into a folder per class."""
    root = tmp_path_factory.mktemp("external") / "ext"
    used = set(load_dataset("three_class", prepared_dir).manifest["path"])
    cohen = read_cohen(shared_data / "cohen").table
    covid = [p for p in cohen[cohen["label"] == "covid"]["path"] if p not in used][:6]
    normal = sorted((shared_data / "kermany" / "chest_xray" / "test" / "NORMAL").glob("*"))[:6]
    for cls, paths in (("covid", covid), ("NORMAL", normal)):
        (root / cls).mkdir(parents=True)
        for p in paths:
            os.symlink(p, root / cls / Path(p).name)
    return root


def test_evaluate_external_folder(
    smoke_study: Path, prepared_dir: Path, external_dir: Path, exported: Path, capsys
) -> None:
    args = ["evaluate", "--data", str(external_dir), "--label-map", "NORMAL=normal"]
    study_args = [*args, "--study", str(smoke_study), "--data-dir", str(prepared_dir), "--quiet"]
    # two of the Kermany normals are images the smoke trial trained on: refused before any work
    assert main(study_args) != 0
    assert "is not external: 2 of its 12 images" in " ".join(capsys.readouterr().err.split())
    assert main([*study_args, "--drop-overlap"]) == 0
    cap = capsys.readouterr()
    out = " ".join(cap.out.split())
    assert "10 images: covid 6, bacterial 0, normal 4" in out
    assert "95% bootstrap CI" in out and "balanced_accuracy" in out and "confusion matrix" in out
    assert "NOT AN EXTERNAL SET" in cap.err  # Cohen and Kermany are the training sources
    # the retrained model says how it trained (smoke: fixed epochs, every training image)
    assert main([*study_args, "--drop-overlap", "--json", "--n-boot", "50"]) == 0
    res = json.loads(capsys.readouterr().out)
    tr = res["model"]["training"]
    assert res["model"]["kind"] == "retrained" and tr["epochs_from"] == "config"
    assert tr["n_trained_images"] == res["model"]["images"]

    assert main([*args, "--model", str(exported), "--json", "--n-boot", "200"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"]["kind"] == "exported" and res["n_images"] == 12
    b = res["bootstrap"]
    assert b["n_boot"] == 200 and b["unit"] == "image"
    acc = b["metrics"]["accuracy"]
    assert acc["ci_low"] <= acc["estimate"] <= acc["ci_high"]
    assert res["metrics"]["confusion_matrix"][1] == [0, 0, 0]
    assert res["overlap"]["same_source"] == {"cohen": 6, "kermany": 6}

    # a CSV manifest with patient ids: the bootstrap resamples patients
    images = sorted(p for p in external_dir.rglob("*") if p.is_file())
    csv = external_dir.parent / "ext.csv"
    csv.write_text(
        "path,label,patient_id\n"
        + "".join(f"{p},{p.parent.name},pt{i // 2}\n" for i, p in enumerate(images))
    )
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(csv),
                "--model",
                str(exported),
                "--json",
                "--label-map",
                "NORMAL=normal",
                "--n-boot",
                "100",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["bootstrap"]["unit"] == "patient" and res["bootstrap"]["n_units"] == 6


def test_evaluate_bad_images(
    external_dir: Path, exported: Path, shared_data: Path, tmp_path: Path, capsys
) -> None:
    ext = tmp_path / "ext"
    for cls in ("covid", "NORMAL"):
        (ext / cls).mkdir(parents=True)
        for p in sorted((external_dir / cls).iterdir())[:2]:
            os.symlink(p.resolve(), ext / cls / p.name)
    os.symlink(shared_data / "bad" / "truncated.jpeg", ext / "NORMAL" / "truncated.jpeg")
    args = [
        "evaluate",
        "--data",
        str(ext),
        "--model",
        str(exported),
        "--label-map",
        "NORMAL=normal",
        "--n-boot",
        "50",
    ]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "1 external image(s) cannot be used" in err and "truncated.jpeg" in err
    assert "--skip-bad" in err
    assert main([*args, "--skip-bad"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "4 images" in out and "skipped 1 unreadable file(s)" in out


def test_cli_errors(
    smoke_study: Path,
    prepared_dir: Path,
    external_dir: Path,
    exported: Path,
    tmp_path: Path,
    real_images: list[Path],
    capsys,
) -> None:
    base = [
        "evaluate",
        "--data",
        str(external_dir),
        "--study",
        str(smoke_study),
        "--data-dir",
        str(prepared_dir),
    ]
    assert main([*base, "--label-map", "NORMAL"]) == 2
    assert "--label-map expects KEY=VALUE, but got 'NORMAL'" in capsys.readouterr().err
    assert main(base) == 2  # NORMAL is not a class of the study
    err = " ".join(capsys.readouterr().err.split())
    assert "['NORMAL'] are not classes of the study" in err
    assert "allowed: ['covid', 'bacterial', 'normal']" in err and "NORMAL=normal" in err
    assert main([*base, "--label-map", "NORMAL=normal", "--trial", "99"]) == 2
    assert "no trial 99" in capsys.readouterr().err
    assert (
        main(["export", "--study", str(smoke_study), "--trial", "99", "--out", str(tmp_path / "m")])
        == 2
    )
    assert "no trial 99" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing"), str(real_images[0])]) == 2
    assert "model directory" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(external_dir), "--model", str(tmp_path)]) == 2
    assert "not an exported model" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tmp_path / "none"), "--model", str(exported)]) == 2
    assert "--data" in capsys.readouterr().err


def test_evaluate_reads_a_folder_as_search_external_does(
    tmp_path: Path, external_dir: Path
) -> None:
    """Issue 25: `evaluate --data` decoded files itself and kept copies as separate rows;
    `search --external` prepared the same folder through the data layer, which removes exact
    copies and merges re-framed ones. Both now keep the same rows."""
    import pandas as pd

    from automl_cxr.data import prepare_table, read_folder
    from automl_cxr.data._reframe import reframe
    from automl_cxr.deploy import load_external

    root = tmp_path / "ext"
    shutil.copytree(external_dir, root)  # the links, as links
    covid = sorted((root / "covid").iterdir())
    shutil.copyfile(covid[0], root / "covid" / "exact_copy.jpg")
    copy = reframe(decode_gray(covid[1]).pixels, np.random.default_rng(0))
    (root / "covid" / f"reframed_copy{copy.suffix}").write_bytes(copy.data)
    ext = load_external(root, ["covid", "bacterial", "normal"], 32, label_map={"NORMAL": "normal"})
    assert len(ext.table) == 12 and ext.images.shape == (12, 32, 32)
    prepared = prepare_table(
        read_folder(root),
        name="same",
        data_dir=tmp_path / "prep",
        kind="external",
        origin=str(root),
        min_classes=1,
    )
    kept = pd.read_csv(prepared / "manifest.csv")["path"]
    assert sorted(map(str, ext.table["path"])) == sorted(map(str, kept))
