"""`automl-cxr search` end to end on the real shared data (smoke profile), and its inputs."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from automl_cxr.cli import main
from automl_cxr.errors import ConfigError
from automl_cxr.models import num_stages
from automl_cxr.study import SearchSettings, SearchSpace, load_space, run_search

STABLE_KEYS = (
    "accuracy",
    "covid_sensitivity",
    "covid_specificity",
    "macro_f1",
    "auc",
    "metrics",
    "config",
    "params_total",
    "params_trainable",
    "latency_ms",
    "train_seconds",
    "fail_reason",
)


def _study(db: Path) -> optuna.Study:
    names = optuna.get_all_study_names(f"sqlite:///{db}")
    assert len(names) == 1
    return optuna.load_study(study_name=names[0], storage=f"sqlite:///{db}")


def test_search_cli_runs_and_resumes(tmp_path: Path, prepared_dir: Path, capsys) -> None:
    db = tmp_path / "s.db"
    args = [
        "search",
        "--dataset",
        "three_class",
        "--profile",
        "smoke",
        "--storage",
        str(db),
        "--data-dir",
        str(prepared_dir),
        "--quiet",
    ]
    assert main([*args, "--trials", "4"]) == 0
    out = capsys.readouterr().out
    assert "three_class-smoke" in out and "best balanced_accuracy" in out
    study = _study(db)
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) == 4
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert complete, "at least one trial should complete"
    for t in complete:
        for key in STABLE_KEYS:
            assert key in t.user_attrs, key
        for key in ("accuracy", "covid_sensitivity", "covid_specificity", "macro_f1", "auc"):
            assert 0.0 <= t.user_attrs[key] <= 1.0
        assert t.value == pytest.approx(
            t.user_attrs["metrics"]["summary"]["metrics"]["balanced_accuracy"]["mean"]
        )
        assert t.intermediate_values
        cfg = t.user_attrs["config"]
        assert cfg["model"]["backbone"] == t.params.get("backbone", cfg["model"]["backbone"])
        assert 0 <= cfg["model"]["frozen_stages"] <= cfg["num_stages"]
        json.dumps(t.user_attrs, allow_nan=False)  # strict JSON for optuna-dashboard
    assert study.user_attrs["dataset"] == "three_class"
    assert study.user_attrs["source_label_alignment"]["warning"]
    # re-running with more trials adds exactly the missing ones
    assert main([*args, "--trials", "6"]) == 0
    study = _study(db)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 6
    first = {t.number: t.params for t in study.trials if t.number < 4}
    assert {t.number: t.params for t in _study(db).trials if t.number < 4} == first
    # The resumed run draws new configurations; it does not replay the first run's draws.
    for t in study.trials[4:]:
        assert t.params not in list(first.values()), t.number


def test_same_seed_same_parameters_and_metrics(tmp_path: Path, prepared_dir: Path) -> None:
    def run(db: Path) -> list:
        run_search(
            SearchSettings(
                dataset="binary",
                trials=3,
                data_dir=prepared_dir,
                storage=str(db),
                profile="smoke",
                pruner="none",
                seed=7,
            )
        )
        return [(t.params, t.value) for t in _study(db).trials]

    assert run(tmp_path / "a.db") == run(tmp_path / "b.db")


def test_space_file_errors_name_the_key(tmp_path: Path) -> None:
    bad = {
        "frozen_depth: [1, 2]\n": "unknown key(s) ['frozen_depth']",
        "lr: {low: 0.1, high: 0.01}\n": "'lr': low must not exceed high",
        "lr: {low: 0, high: 0.1, log: true}\n": "'lr': a log range needs low > 0",
        "heads: {transformer: {}}\n": "unknown head 'transformer'",
        "backbones: [resnet5O]\n": "resnet5O",
        "frozen_fraction: {low: 0.0, high: 2.0}\n": "'frozen_fraction' must lie in [0, 1]",
        "lr: {low: 1.0e-3}\n": "'lr': a range needs both",
    }
    for text, message in bad.items():
        p = tmp_path / "space.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=None) as exc:
            load_space(p)
        assert message in str(exc.value), (text, str(exc.value))


def test_default_and_paper_spaces_load() -> None:
    root = Path(__file__).resolve().parent.parent / "studies"
    for f in (
        "default.yaml",
        "paper_three_class.yaml",
        "paper_four_class.yaml",
        "paper_binary.yaml",
    ):
        s = load_space(root / f)
        assert isinstance(s, SearchSpace) and s.heads
    paper = load_space(root / "paper_three_class.yaml")
    assert paper.backbones == (
        "vgg19",
        "mobilenetv2_100",
        "inception_v3",
        "legacy_xception",
        "inception_resnet_v2",
    )


def test_frozen_fraction_always_valid_for_every_backbone(
    tmp_path: Path, prepared_dir: Path
) -> None:
    from automl_cxr.data import load_dataset
    from automl_cxr.study import Objective, get_profile, subsample

    ds = subsample(load_dataset("three_class", prepared_dir), 5, 0)
    space = load_space(None)
    space.backbones = ("test_efficientnet", "test_resnet", "mobilenetv2_100", "vgg19")
    obj = Objective(ds, space, get_profile("smoke"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        plan = obj.sample(trial)  # ModelConfig validation would raise on an invalid depth
        from automl_cxr.models import num_stages

        assert 0 <= plan.model.frozen_stages <= num_stages(plan.model.backbone)
        study.tell(trial, 0.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"--dataset": "five_class"}, "unknown dataset 'five_class'"),
        ({"--trials": "0"}, "trials must be at least 1, but got trials=0"),
        ({"--trials": "-3"}, "trials must be at least 1, but got trials=-3"),
        ({"--profile": "tpu"}, "unknown profile 'tpu'"),
        ({"--sampler": "cmaes"}, "sampler must be one of"),
        ({"--pruner": "asha"}, "pruner must be one of"),
        ({"--metric": "f2"}, "unknown metric 'f2'"),
        ({"--space": "/nonexistent/space.yaml"}, "search space file not found"),
        ({"--storage": "postgresql://nobody@127.0.0.1:1/x"}, "cannot open storage"),
    ],
)
def test_search_bad_input_clear_error(
    options: dict, message: str, prepared_dir: Path, tmp_path: Path, capsys
) -> None:
    opts = {
        "--dataset": "three_class",
        "--trials": "2",
        "--profile": "smoke",
        "--storage": str(tmp_path / "x.db"),
        "--data-dir": str(prepared_dir),
        **options,
    }
    rc = main(["search", *[x for kv in opts.items() for x in kv], "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert "Traceback" not in err


def test_search_takes_a_builtin_space_by_name(prepared_dir: Path, tmp_path: Path, capsys) -> None:
    # `--space robust` names the built-in space (no such file here): it loads, and the search
    # stops only where the robust space needs a lung segmenter this data folder lacks
    import shutil

    data = tmp_path / "data"
    shutil.copytree(
        prepared_dir / "binary_adult", data / "binary_adult", ignore=shutil.ignore_patterns("cache")
    )
    argv = ["search", "--dataset", "binary_adult", "--trials", "1", "--profile", "smoke"]
    argv += ["--space", "robust", "--storage", str(tmp_path / "x.db"), "--data-dir", str(data)]
    rc = main([*argv, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "search space file not found" not in err and "lungs train" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("space", "dataset"),
    [
        ("paper_three_class.yaml", "three_class"),
        ("paper_four_class.yaml", "four_class"),
        ("paper_binary.yaml", "binary"),
    ],
)
def test_paper_studies_run_with_smoke_profile(
    space: str, dataset: str, tmp_path: Path, prepared_dir: Path
) -> None:
    """The paper's experiment (its five CNNs, random init here) completes a short CPU run."""
    root = Path(__file__).resolve().parent.parent / "studies"
    paper = {"vgg19", "mobilenetv2_100", "inception_v3", "legacy_xception", "inception_resnet_v2"}
    summary = run_search(
        SearchSettings(
            dataset=dataset,
            trials=2,
            data_dir=prepared_dir,
            storage=str(tmp_path / "p.db"),
            space=root / space,
            profile="smoke",
            pruner="none",
        )
    )
    study = _study(tmp_path / "p.db")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2, summary
    for t in done:
        assert t.user_attrs["config"]["model"]["backbone"] in paper
        assert t.user_attrs["config"]["model"]["head_kwargs"]["dropout"] == 0.5


def test_multi_objective_keeps_a_pareto_front(tmp_path: Path, prepared_dir: Path) -> None:
    run_search(
        SearchSettings(
            dataset="binary",
            trials=3,
            data_dir=prepared_dir,
            storage=str(tmp_path / "m.db"),
            profile="smoke",
            objectives=["accuracy", "latency"],
        )
    )
    study = _study(tmp_path / "m.db")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.user_attrs["sampler"] == "nsga2"  # the multi-objective default
    assert study.best_trials
    for t in study.best_trials:
        assert t.values[0] == pytest.approx(t.user_attrs["accuracy"])
        assert t.values[1] == pytest.approx(t.user_attrs["latency_ms"])


def test_cpu_profile_defaults_to_the_deep_freezing_space() -> None:
    from automl_cxr.study import get_profile
    from automl_cxr.study._setup import resolve_space

    cpu = resolve_space(None, get_profile("cpu"))
    assert cpu.source.endswith("cpu.yaml")
    assert cpu.frozen_fraction.low == 0.85 and cpu.train["augment"].value == 0.0
    assert resolve_space(None, get_profile("smoke")).source.endswith("default.yaml")
    explicit = Path(__file__).resolve().parent.parent / "studies" / "paper_binary.yaml"
    assert resolve_space(explicit, get_profile("cpu")).source == str(explicit)


def test_paper_cpu_profile_swaps_in_backbones_with_offline_weights(offline_weights) -> None:
    """The paper's study file names five CNNs; `paper-cpu` runs it with the ones whose ImageNet
    weights install offline (MobileNet v2, EfficientNet-Lite0), keeping the paper's protocol."""
    from automl_cxr.study import adapt_space, get_profile, resolve_space

    paper_file = Path(__file__).resolve().parent.parent / "studies" / "paper_three_class.yaml"
    space = resolve_space(paper_file, get_profile("paper-cpu"))
    said: list[str] = []
    got = adapt_space(space, get_profile("paper-cpu"), said.append)
    assert got.backbones == ("mobilenetv2_100", "tf_efficientnet_lite0")
    assert "vgg19" in said[0] and "in place of" in said[0]
    # Only the frozen depths a CPU can afford over 10 folds x 10 epochs; the file is untouched.
    assert (got.frozen_fraction.low, got.frozen_fraction.high) == (0.75, 1.0)
    assert "searching [0.75, 1.0]" in said[1]
    assert (space.frozen_fraction.low, len(space.backbones)) == (0.5, 5)
    same = adapt_space(space, get_profile("paper"))
    assert same.backbones == space.backbones and same.frozen_fraction.low == 0.5
    cpu, gpu = get_profile("paper-cpu"), get_profile("paper")
    assert (cpu.n_folds, cpu.epochs) == (gpu.n_folds, gpu.epochs) == (10, 10)
    assert cpu.resolution < gpu.resolution


def test_frozen_floor_rejects_spaces_it_cannot_honour() -> None:
    from dataclasses import replace

    from automl_cxr.study import SearchSpace, adapt_space, get_profile
    from automl_cxr.study._space import parse_param

    prof = replace(get_profile("smoke"), min_frozen_fraction=0.75)
    shallow = SearchSpace(frozen_fraction=parse_param("frozen_fraction", {"low": 0.0, "high": 0.5}))
    with pytest.raises(ConfigError, match=r"needs frozen_fraction >= 0.75.*\[0.0, 0.5\]"):
        adapt_space(shallow, prof)
    picks = SearchSpace(frozen_fraction=parse_param("frozen_fraction", [0.25, 0.75, 1.0]))
    assert adapt_space(picks, prof).frozen_fraction.choices == (0.75, 1.0)
    with pytest.raises(ConfigError, match="fixes it at 0.5"):
        adapt_space(SearchSpace(frozen_fraction=parse_param("frozen_fraction", 0.5)), prof)


def test_enqueue_runs_given_configurations_first(tmp_path: Path, prepared_dir: Path) -> None:
    """`--enqueue` puts known configurations (e.g. the paper's own) at the head of the study;
    what it leaves out is sampled, and queuing the same one again adds nothing."""
    db = tmp_path / "q.db"
    args = ["search", "--dataset", "binary", "--profile", "smoke", "--storage", str(db)]
    args += ["--data-dir", str(prepared_dir), "--quiet"]
    first = "backbone=test_resnet,frozen_fraction=1.0,head=mlp,mlp.hidden=128"
    assert main([*args, "--trials", "2", "--enqueue", first]) == 0
    trials = _study(db).trials
    # A queued configuration is a reference: it runs every fold and epoch, never pruned.
    assert trials[0].user_attrs["reference"] and trials[0].state.name == "COMPLETE"
    assert len(trials[0].intermediate_values) == 2 * 2  # smoke: 2 folds x 2 epochs
    assert trials[0].params["backbone"] == "test_resnet"
    assert trials[0].params["frozen_fraction"] == 1.0 and trials[0].params["mlp.hidden"] == 128
    assert trials[0].user_attrs["config"]["model"]["frozen_stages"] == num_stages("test_resnet")
    assert "lr" in trials[0].params  # sampled
    assert main([*args, "--trials", "2", "--enqueue", first]) == 0
    assert len(_study(db).trials) == 2


def test_check_params_messages() -> None:
    space = load_space(Path(__file__).resolve().parent.parent / "studies" / "cpu.yaml")
    assert space.check_params({"mlp.hidden": "256", "mlp.batchnorm": "false"}) == {
        "mlp.hidden": 256,
        "mlp.batchnorm": False,
    }
    with pytest.raises(ConfigError, match=r"unknown parameter 'lrr'; this space has \["):
        space.check_params({"lrr": "0.1"})
    with pytest.raises(ConfigError, match=r"lr must lie in \[0.0001, 0.03\], but got '3'"):
        space.check_params({"lr": "3"})
    with pytest.raises(ConfigError, match=r"mlp.hidden must be one of \[128, 256, 512\]"):
        space.check_params({"mlp.hidden": "100"})
    with pytest.raises(ConfigError, match="do not belong to head 'linear'"):
        space.check_params({"head": "linear", "mlp.hidden": "128"})


def test_requeue_only_what_has_no_full_result() -> None:
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from automl_cxr.study._setup import _queued_or_done

    study = optuna.create_study()
    dist = {"lr": FloatDistribution(1e-4, 1e-1), "x": FloatDistribution(0, 1)}

    def add(state, lr):
        value = 0.5 if state == TrialState.COMPLETE else None
        study.add_trial(
            create_trial(state=state, params={"lr": lr, "x": 0.3}, distributions=dist, value=value)
        )

    add(TrialState.PRUNED, 0.01)
    add(TrialState.FAIL, 0.02)
    assert not _queued_or_done(study, {"lr": 0.01}) and not _queued_or_done(study, {"lr": 0.02})
    add(TrialState.COMPLETE, 0.01)
    assert _queued_or_done(study, {"lr": 0.01})
    assert not _queued_or_done(study, {"lr": 0.01, "x": 0.4})
    study.enqueue_trial({"lr": 0.03})
    assert _queued_or_done(study, {"lr": 0.03})


def test_cpu_amp_comes_from_the_profile_and_the_cli_overrides_it(
    tmp_path: Path, prepared_dir: Path
) -> None:
    from automl_cxr.engine import cpu_bf16_supported
    from automl_cxr.study import get_profile

    assert get_profile("cpu").cpu_amp and not get_profile("smoke").cpu_amp
    args = ["search", "--dataset", "binary", "--profile", "smoke", "--trials", "1"]
    args += ["--data-dir", str(prepared_dir), "--pruner", "none", "--quiet"]
    expected = {"--cpu-amp": "bf16" if cpu_bf16_supported() else "fp32", None: "fp32"}
    for flag, precision in expected.items():
        db = tmp_path / f"{flag}.db"
        assert main([*args, "--storage", str(db), *([flag] if flag else [])]) == 0
        study = _study(db)
        (t,) = study.trials
        assert t.user_attrs["config"]["train"]["cpu_amp"] is (flag is not None)
        assert t.user_attrs["precision"] == precision
        assert study.user_attrs["profile"]["cpu_amp"] is (flag is not None)


@pytest.mark.parametrize("kind", ["sqlite", "sqlite_rows", "journal", "memory"])
def test_set_user_attrs_writes_what_set_user_attr_writes(
    tmp_path: Path, kind: str, monkeypatch
) -> None:
    """Several user attributes at once (one transaction on an RDB storage, without a
    `set_user_attr` per key) land exactly as one `set_user_attr` per key would, in the storage
    and on the live trial."""
    import warnings

    from automl_cxr._compat import optuna as _compat
    from automl_cxr._compat.optuna import set_user_attrs, storage_of
    from automl_cxr.study import open_storage

    if kind == "sqlite_rows":  # a database without a known upsert: Optuna's per-row write
        monkeypatch.setattr(_compat, "_upsert", lambda *a: None)
    storage = {
        "sqlite": lambda: open_storage(tmp_path / "a.db"),
        "sqlite_rows": lambda: open_storage(tmp_path / "a.db"),
        "journal": lambda: open_storage(tmp_path / "a.log"),
        "memory": lambda: None,
    }[kind]()
    study = optuna.create_study(storage=storage)
    attrs = {"a": 1, "b": {"nested": [1.5, None, "x"]}, "c": None, "big": list(range(5000))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat outside optimize
        one, many = study.ask(), study.ask()
    for key, value in attrs.items():
        one.set_user_attr(key, value)
    one.set_user_attr("a", 2)
    real = optuna.trial.Trial.set_user_attr
    if kind.startswith("sqlite"):  # the installed Optuna still offers the one-transaction path
        monkeypatch.setattr(optuna.trial.Trial, "set_user_attr", None)
    set_user_attrs(many, attrs)
    set_user_attrs(many, {"a": 2})  # overwrites, as set_user_attr does
    monkeypatch.setattr(optuna.trial.Trial, "set_user_attr", real)
    assert many.user_attrs == one.user_attrs == {**attrs, "a": 2}
    stored = storage_of(study).get_trial(many._trial_id).user_attrs
    assert stored == one.user_attrs
    study.tell(one, 1.0)
    study.tell(many, 1.0)
    with pytest.raises(RuntimeError):  # a finished trial is not updatable, as with set_user_attr
        set_user_attrs(many, {"late": 1})


def test_sampling_through_one_read_draws_what_plain_tpe_draws(tmp_path: Path) -> None:
    """The search's sampler wrapper gives TPE one read of the trials per relative draw
    (`one_read`) instead of one per parameter group: the same parameters as plain TPE
    (multivariate, group, constant liar) on the same history with trials still running."""
    import warnings

    from automl_cxr.study import open_storage
    from automl_cxr.study._optuna import WorkerTaggingSampler, make_sampler

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 1e-4, 1.0, log=True)
        if trial.suggest_categorical("head", ["linear", "mlp"]) == "mlp":
            x += trial.suggest_int("hidden", 16, 256, log=True) / 1000
        return x

    study = optuna.create_study(
        storage=open_storage(tmp_path / "s.db"), sampler=optuna.samplers.RandomSampler(seed=0)
    )
    study.optimize(objective, n_trials=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # running trials: constant liar counts them
            objective(study.ask())
    storage = study._storage
    reads = []
    real_read = storage.get_all_trials
    storage.get_all_trials = lambda *a, **k: reads.append(1) or real_read(*a, **k)
    running = study.get_trials(deepcopy=False)[-1]
    for seed in range(3):
        draws = []
        for sampler in (
            make_sampler("tpe", seed, multi=False),
            WorkerTaggingSampler(make_sampler("tpe", seed, multi=False)),
        ):
            reads.clear()
            space = sampler.infer_relative_search_space(study, running)
            draws.append((sampler.sample_relative(study, running, space), len(reads)))
        (plain, plain_reads), (ours, our_reads) = draws
        assert plain and ours == plain
        assert our_reads == 1 < plain_reads
