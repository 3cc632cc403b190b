"""The de-confounding levers of the `robust` space on the real shared X-rays: the lung
segmenter (trained here from V7's outlines, scored on held-out Cohen sites), the roi and
intensity preprocessing (checked against OpenCV), its cache, and the site-adversarial head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from automl_cxr.data import decode_gray, resize_square
from automl_cxr.engine import TrainConfig, run_trial
from automl_cxr.engine._adversarial import SiteAdversary, grad_reverse
from automl_cxr.errors import ConfigError, DataError
from automl_cxr.lungs import (
    CANVAS,
    Preprocess,
    PreprocessSpec,
    clahe,
    equalize,
    load_segmenter,
    preprocessed_images,
    train_segmenter,
)
from automl_cxr.models import ModelConfig

# Held-out Dice of the test's short training run (64 px, 3 epochs, seed 0): 0.877 measured on
# this machine (the full `lungs train` default, 128 px x 12 epochs: see README); the bar leaves
# room for CPU-to-CPU numeric differences but fails a segmenter that misses the lungs.
MIN_HELDOUT_DICE = 0.75


@pytest.fixture(scope="session")
def segmenter_file(tmp_path_factory, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("lungs") / "segmenter.pt"
    train_segmenter(
        shared_data / "lungmasks" / "v7labs-covid-only.zip",
        shared_data / "cohen",
        out,
        size=64,
        epochs=3,
        seed=0,
    )
    return out


def _canvas(paths) -> np.ndarray:
    return np.stack([resize_square(decode_gray(p).pixels, CANVAS) for p in paths])


def _levels(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).float().unsqueeze(1)


def test_equalize_and_clahe_are_opencvs(shared_data: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    files = sorted((shared_data / "cohen" / "images").iterdir())[:8]
    files += sorted((shared_data / "nih" / "images").iterdir())[:4]
    canvas = _canvas(files)
    eq = equalize(_levels(canvas)).squeeze(1).numpy().astype(np.uint8)
    cl = clahe(_levels(canvas)).squeeze(1).numpy().astype(np.uint8)
    filt = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    for i, a in enumerate(canvas):
        assert np.array_equal(eq[i], cv2.equalizeHist(a))
        assert np.array_equal(cl[i], filt.apply(a))
    flat = np.full((1, CANVAS, CANVAS), 77, dtype=np.uint8)  # a constant image stays itself
    assert np.array_equal(equalize(_levels(flat)).numpy().astype(np.uint8)[:, 0], flat)


def test_gradient_reversal_flips_the_sign_numerically() -> None:
    torch.manual_seed(0)
    w = torch.randn(5)
    x = torch.randn(5, requires_grad=True)
    (grad_reverse(x, 0.7) * w).sum().backward()
    # d/dx of sum(w * x) by central differences is w; reversal makes it -0.7 w
    eps = 1e-3
    fd = torch.stack(
        [
            ((w * (x.detach() + eps * e)).sum() - (w * (x.detach() - eps * e)).sum()) / (2 * eps)
            for e in torch.eye(5)
        ]
    )
    assert torch.allclose(x.grad, -0.7 * fd, atol=1e-4)
    assert torch.equal(grad_reverse(x).detach(), x.detach())  # identity forward
    # the adversary's own weights still descend its loss (only the features are reversed)
    adv = SiteAdversary(5, n_classes=2, n_sites=3)
    z = torch.randn(8, 5, requires_grad=True)
    y = torch.tensor([0, 1] * 4)
    torch.nn.functional.cross_entropy(adv(z, y), torch.arange(8) % 3).backward()
    plain = SiteAdversary(5, n_classes=2, n_sites=3)
    plain.load_state_dict(adv.state_dict())
    z2 = z.detach().clone().requires_grad_(True)
    out = plain.net(z2).view(-1, 2, 3)[torch.arange(8), y]
    torch.nn.functional.cross_entropy(out, torch.arange(8) % 3).backward()
    assert torch.allclose(z.grad, -z2.grad, atol=1e-6)


def test_segmenter_dice_on_held_out_cohen_sites(segmenter_file: Path) -> None:
    seg = load_segmenter(segmenter_file)
    held = seg.info["heldout"]
    assert held["images"] >= 20 and len(held["sites"]) >= 5
    assert held["dice_mean"] >= MIN_HELDOUT_DICE, held
    assert seg.key == f"lungs:{seg.sha256[:16]}"
    with pytest.raises(DataError, match="lungs train"):
        load_segmenter(segmenter_file.with_name("missing.pt"))


def test_roi_crops_to_the_lungs_and_falls_back_with_a_count(
    segmenter_file: Path, shared_data: Path
) -> None:
    seg = load_segmenter(segmenter_file)
    files = sorted((shared_data / "nih" / "images").iterdir())[:12]
    x = _levels(_canvas(files)) / 255.0
    full = Preprocess(PreprocessSpec("full", "none"), 64)
    crop = Preprocess(PreprocessSpec("lung_crop", "none", seg.key), 64, seg)
    mask = Preprocess(PreprocessSpec("lung_mask", "none", seg.key), 64, seg)
    with torch.inference_mode():
        f, ok_f = full.forward_status(x)
        c, ok_c = crop.forward_status(x)
        m, ok_m = mask.forward_status(x)
    assert ok_f.all() and torch.equal(ok_c, ok_m)
    assert ok_c.float().mean() >= 0.75, "lungs not found on most adult NIH films"
    i = int(torch.nonzero(ok_c)[0])
    assert not torch.equal(c[i], f[i])  # cropped
    assert (m[i] == 0).float().mean() > (c[i] == 0).float().mean()  # outside blanked
    # a film with no lungs in it (a flat grey field) falls back to `full`, counted as such
    blank = torch.full((2, 1, CANVAS, CANVAS), 0.5)
    out, ok = crop.forward_status(blank)
    assert not ok.any()
    assert torch.equal(out, full(blank))
    with pytest.raises(ConfigError, match="roi must be one of"):
        PreprocessSpec("lungs", "none")


def test_preprocessed_cache_is_keyed_by_segmenter_and_transform(
    adult_small, segmenter_file: Path, tmp_path: Path
) -> None:
    seg = load_segmenter(segmenter_file)
    a = PreprocessSpec("lung_crop", "clahe", seg.key)
    b = PreprocessSpec("lung_crop", "clahe", "lungs:0000000000000000")
    c = PreprocessSpec("lung_mask", "clahe", seg.key)
    d = PreprocessSpec("full", "clahe", seg.key)
    assert len({a.key(), b.key(), c.key()}) == 3
    assert d.key() == PreprocessSpec("full", "clahe").key()  # full needs no segmenter
    pre = preprocessed_images(adult_small, a, Preprocess(a, 48, seg))
    files = sorted((Path(adult_small.root) / "cache").glob(f"*{a.key()}*"))
    assert len(files) == 2 and pre.images.shape == (len(adult_small), 48, 48)
    assert pre.fallbacks == int((~pre.found).sum()) < len(adult_small) // 2
    # the cache holds what the module computes from the canvas
    x = torch.from_numpy(np.array(adult_small.images(CANVAS)[:4])).float().div(255).unsqueeze(1)
    with torch.inference_mode():
        y = Preprocess(a, 48, seg)(x)
    assert np.array_equal(np.asarray(pre.images[:4]), (y * 255).round().squeeze(1).byte().numpy())


def _cfg(**kw) -> TrainConfig:
    base = dict(resolution=48, epochs=2, batch_size=16, n_folds=2, lr=3e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _mlp(ds) -> ModelConfig:
    return ModelConfig(
        backbone="test_efficientnet",
        num_classes=len(ds.classes),
        pretrained=False,
        frozen_stages=4,
        head="mlp",
        head_kwargs={"hidden": 32},
    )


def test_quantise_rounds_ties_to_even_whatever_the_float_error() -> None:
    from automl_cxr.lungs import quantise

    v = [10.5, 10.5 - 1e-12, 10.5 + 1e-12, 11.5, 11.5 - 1e-12, 10.25, 10.75, 10.49, -3.0, 300.0]
    got = quantise(torch.tensor(v, dtype=torch.float64)).tolist()
    # a tie and its float-error neighbours round alike (to even); everything else to nearest
    assert got == [10, 10, 10, 12, 12, 10, 11, 10, 0, 255]


def test_preprocess_layer_gives_the_same_gray_levels_under_onnx_and_torchscript(
    shared_data: Path, segmenter_file: Path, tmp_path: Path
) -> None:
    """Each roi and intensity, real films: the exported graphs (the exporter `export` uses)
    produce exactly PyTorch's gray levels, so an exported model sees the search's input.
    Before float64 resampling, ONNX Runtime moved 60-1,700 of 983,040 pixels by one level."""
    from automl_cxr.deploy._export import export_onnx
    from automl_cxr.deploy._runtime import onnx_session

    files = sorted((shared_data / "cohen" / "images").iterdir())[:4]
    files += sorted((shared_data / "nih" / "images").iterdir())[:2]
    x = torch.from_numpy(_canvas(files)).float().div(255).unsqueeze(1)
    seg = load_segmenter(segmenter_file)
    for roi, mode in (("full", "none"), ("lung_crop", "clahe"), ("lung_mask", "equalize")):
        pre = Preprocess(PreprocessSpec(roi, mode, seg.key), 128, seg).eval()
        with torch.no_grad():
            want = pre(x).numpy()
            ts = torch.jit.trace(pre, x[:1], check_trace=False)(x).numpy()
        path = tmp_path / f"{roi}_{mode}.onnx"
        export_onnx(pre, path, CANVAS)
        got = onnx_session(path).run(None, {"image": x.numpy()})[0]
        assert np.array_equal(ts, want), (roi, mode)
        assert np.array_equal(got, want), (roi, mode, int((got != want).sum()))


def test_site_adversarial_zero_is_no_second_head_and_nonzero_trains_one(adult_small) -> None:
    ds = adult_small
    plain = run_trial(ds, _mlp(ds), _cfg())
    zero = run_trial(ds, _mlp(ds), _cfg(site_adversarial=0.0))
    assert np.array_equal(plain.oof_probs, zero.oof_probs, equal_nan=True)
    adv = run_trial(ds, _mlp(ds), _cfg(site_adversarial=1.0))
    assert not np.allclose(plain.oof_probs, adv.oof_probs, equal_nan=True)
    again = run_trial(ds, _mlp(ds), _cfg(site_adversarial=1.0))
    assert np.array_equal(adv.oof_probs, again.oof_probs, equal_nan=True)  # seeded


def test_robust_trial_runs_on_cached_preprocessing(adult_small, segmenter_file: Path) -> None:
    ds = adult_small
    cfg = _cfg(
        roi="lung_mask",
        intensity="equalize",
        site_adversarial=0.3,
        segmenter=str(segmenter_file),
        cv="site",
    )
    res = run_trial(ds, _mlp(ds), cfg)
    pp = res.preprocess
    assert pp["roi"] == "lung_mask" and pp["intensity"] == "equalize"
    assert pp["fallbacks"][ds.name]["images"] == len(ds)
    assert "lungs:" in pp["key"]
    assert res.feature_cache["used"]
    assert "worst_site_balanced_accuracy" in res.summary["metrics"]
    folds = res.summary["metrics"]["balanced_accuracy"]["folds"]
    assert res.summary["metrics"]["worst_site_balanced_accuracy"]["mean"] == min(folds)


def test_a_roi_trial_does_not_depend_on_whether_its_segmenter_was_loaded(
    adult_small, segmenter_file: Path
) -> None:
    """The first roi trial of a process builds the segmenter, later ones find it loaded: both
    train the same model (building it drew from the seeded generator and moved the dropout
    masks; found by exporting one trial twice)."""
    from automl_cxr.lungs import _unet

    ds = adult_small
    model = ModelConfig(
        backbone="test_efficientnet",
        num_classes=len(ds.classes),
        pretrained=False,
        frozen_stages=4,
        head="mlp",
        head_kwargs={"hidden": 32, "dropout": 0.5},
    )
    cfg = _cfg(roi="lung_mask", segmenter=str(segmenter_file), epochs=3)
    _unet._LOADED.clear()
    first = run_trial(ds, model, cfg)
    again = run_trial(ds, model, cfg)  # the segmenter is loaded now
    assert np.array_equal(first.oof_probs, again.oof_probs, equal_nan=True)


def test_lung_crop_export_predicts_what_the_search_saw(
    prepared_dir: Path, segmenter_file: Path, tmp_path: Path
) -> None:
    """A raw radiograph through the exported lung_crop + clahe model (PyTorch, TorchScript,
    ONNX) gets the probabilities the search-time pipeline (cached preprocessed image → model)
    gives it, within 1e-4."""
    import shutil

    from automl_cxr.deploy import ExportedModel, export_trial, load_image, open_trial, training_data
    from automl_cxr.lungs import preprocess_for
    from automl_cxr.study import SearchSettings, run_search

    (prepared_dir / "lungs").mkdir(exist_ok=True)
    shutil.copy(segmenter_file, prepared_dir / "lungs" / "segmenter.pt")
    space = tmp_path / "space.yaml"
    space.write_text(
        "backbones: [test_efficientnet]\nfrozen_fraction: 1.0\nheads: {linear: {}}\n"
        "roi: lung_crop\nintensity: clahe\nsite_adversarial: 0.0\n"
    )
    db = tmp_path / "robust.db"
    run_search(
        SearchSettings(
            dataset="binary_adult",
            trials=1,
            data_dir=prepared_dir,
            storage=str(db),
            profile="smoke",
            pruner="none",
            space=space,
        )
    )
    spec = open_trial(db)
    assert spec.train.roi == "lung_crop" and spec.train.intensity == "clahe"
    ds = training_data(spec, prepared_dir)
    out = tmp_path / "model"
    cfg = export_trial(spec, ds, out)
    assert cfg["resolution"] == CANVAS and cfg["preprocess"]["roi"] == "lung_crop"
    assert cfg["checks"]["ok"], cfg["checks"]
    assert "decisions inside the graph" in cfg["checks"]["note"]  # why it could miss
    assert cfg["checks"]["onnx_max_prob_diff"] <= 1e-4
    # the card states the graph's input (the canvas), not the network's
    card_md = (out / "model_card.md").read_text()
    r = spec.train.resolution
    assert f"- resolution: {r} x {r} (the network's; the exported graph takes {CANVAS} px)" in (
        card_md
    )
    assert f"R = {CANVAS}." in card_md and "roi `lung_crop`, intensity `clahe`" in card_md
    rows = np.arange(0, len(ds), max(1, len(ds) // 6))[:6]
    raw = np.stack([load_image(ds.manifest["path"][i], CANVAS).tensor for i in rows])
    pp_spec, pre = preprocess_for(spec.train, prepared_dir)
    cached = preprocessed_images(ds, pp_spec, pre).images[rows]
    inner = ExportedModel(out, runtime="pytorch").torch_model().model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.array(cached)).float().div(255).unsqueeze(1)
        want = torch.softmax(inner(x), dim=1).numpy()
    for rt in ("pytorch", "torchscript", "onnx"):
        got = ExportedModel(out, runtime=rt).predict_proba(raw)
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=rt)

    # the study keeps the segmenter it searched with, and a retrain uses that one even when
    # the data folder's has been replaced (`lungs train` again: another file, another key)
    from automl_cxr.deploy import open_trial as reopen
    from automl_cxr.deploy._select import pin_segmenter
    from automl_cxr.lungs import save_segmenter, study_segmenter

    seg = load_segmenter(segmenter_file)
    kept = study_segmenter(db.with_suffix(".artifacts"), seg.key)
    assert kept.is_file() and load_segmenter(kept).key == seg.key
    other = tmp_path / "other-data"
    save_segmenter(seg.net, other / "lungs" / "segmenter.pt", size=seg.size, info={"again": 1})
    assert load_segmenter(other / "lungs" / "segmenter.pt").key != seg.key
    spec = reopen(db)
    assert pin_segmenter(spec, other) is None and spec.train.segmenter == str(kept)
    kept.unlink()  # a study from before it kept one: refused, by both keys
    spec = reopen(db)
    with pytest.raises(DataError, match=f"searched with lung segmenter {seg.key}.*lungs:"):
        pin_segmenter(spec, other)
    assert pin_segmenter(spec, prepared_dir) is None  # the data folder's is the same file
    spec = reopen(db)
    warned = pin_segmenter(spec, other, any_segmenter=True)
    assert warned and "--any-segmenter" in warned and spec.train.segmenter is None


def test_robust_space_is_builtin_and_refused_without_a_segmenter(
    prepared_dir: Path, tmp_path: Path
) -> None:
    from automl_cxr.study import SearchSettings, builtin_space, run_search

    space = builtin_space("robust")
    params = space.params(("mobilenetv2_100",))
    assert set(params["roi"].choices) == {"full", "lung_crop", "lung_mask"}
    assert set(params["intensity"].choices) == {"none", "equalize", "clahe"}
    assert 0.0 in params["site_adversarial"].choices  # "off" can be drawn
    empty = tmp_path / "data"
    empty.mkdir()
    for name in ("binary_adult",):
        shutil_tree(prepared_dir / name, empty / name)
    with pytest.raises(DataError, match="lungs train"):
        run_search(
            SearchSettings(
                dataset="binary_adult",
                trials=1,
                data_dir=empty,
                storage=str(tmp_path / "s.db"),
                profile="smoke",
                space="robust",
            )
        )
    assert not (tmp_path / "s.db").exists() or not load_trials(tmp_path / "s.db")


def shutil_tree(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))


def load_trials(db: Path) -> list:
    from automl_cxr.study import load_study

    try:
        return load_study(db).get_trials()
    except Exception:
        return []


def test_lungs_cli_errors_are_clear(tmp_path: Path, shared_data: Path) -> None:
    from automl_cxr.cli import main

    assert main(["lungs", "train", "--sources", str(tmp_path)]) == 2  # no cohen/
    assert main(["lungs", "info", str(tmp_path / "none.pt")]) == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["lungs", "info", str(bad)]) == 2
    assert (
        main(
            [
                "lungs",
                "train",
                "--sources",
                str(shared_data),
                "--size",
                "100",
                "--out",
                str(tmp_path / "x.pt"),
            ]
        )
        == 2
    )


def test_worst_site_metric_is_the_minimum_over_held_out_site_folds(adult_small) -> None:
    ds = adult_small
    res = run_trial(ds, _mlp(ds), _cfg(cv="site", n_folds=3), metric="worst_site_balanced_accuracy")
    folds = res.summary["metrics"]["balanced_accuracy"]["folds"]
    assert res.value == pytest.approx(min(folds))
    assert res.summary["metrics"]["worst_site_balanced_accuracy"]["folds"] == folds


def test_source_balance_weighs_each_source_equally_within_a_class(adult_small) -> None:
    from automl_cxr.engine._groups import TrainingLoss

    ds = adult_small
    rows = np.arange(len(ds))[::2]
    loss = TrainingLoss(ds, rows, _cfg(source_balance=True), None, torch.device("cpu"))
    w = loss.balance.numpy()
    assert (w[np.setdiff1d(np.arange(len(ds)), rows)] == 0).all()
    src = ds.manifest["source"].to_numpy()
    for c in np.unique(ds.labels[rows]):
        in_c = rows[ds.labels[rows] == c]
        assert w[in_c].sum() == pytest.approx(len(in_c), rel=1e-5)  # the class keeps its size
        totals = [w[in_c[src[in_c] == s]].sum() for s in np.unique(src[in_c])]
        assert np.allclose(totals, totals[0], rtol=1e-5)  # each source the same share
    assert len(np.unique(src[rows][ds.labels[rows] == ds.classes.index("non_covid")])) >= 2
    plain = run_trial(ds, _mlp(ds), _cfg())
    balanced = run_trial(ds, _mlp(ds), _cfg(source_balance=True))
    assert not np.allclose(plain.oof_probs, balanced.oof_probs, equal_nan=True)
