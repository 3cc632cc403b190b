"""`--backend ray`: Ray Tune runs the trials, the Optuna study stays the one record.

Real chest X-rays (the `prepared_dir` fixture), profile `smoke` (tiny timm test models, 64 px).
Most of the time here is Ray starting and its worker processes importing torch and timm.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from automl_cxr.errors import ConfigError
from automl_cxr.study import FINISHED, SearchSettings, run_search
from automl_cxr.study._ray import _driver as _ray_driver
from automl_cxr.study._ray import _schedulers as ray_backend

ray = pytest.importorskip("ray")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parent.parent

RESULT_KEYS = {
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
    "device",
    "worker",
}


def _load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{storage}")


def _window(t: optuna.trial.FrozenTrial) -> tuple[datetime, datetime]:
    """When the Ray worker ran the trial: from its own start stamp to the driver's tell."""
    start = datetime.fromisoformat(t.user_attrs["worker"]["started"])
    end = t.datetime_complete
    return start, end if end.tzinfo else end.astimezone()  # Optuna's naive local time


def test_unknown_scheduler_is_a_config_error_before_ray_starts(prepared_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"'pbt'.*asha"):
        run_search(
            SearchSettings(
                dataset="three_class",
                trials=1,
                data_dir=prepared_dir,
                storage=str(tmp_path / "s.db"),
                profile="smoke",
                backend="ray",
                scheduler="pbt",
            )
        )
    assert not ray.is_initialized()


def test_driver_maps_tune_outcomes_to_optuna_states():
    """Worker outcome → its state; Ray worker death → FAIL, re-run with its parameters;
    scheduler stop → PRUNED; a stop nobody asked for (e.g. interrupted) → FAIL. No Ray needed."""
    study = optuna.create_study(direction="maximize")
    seen = []
    driver = _ray_driver.Driver(
        study,
        None,
        target=9,
        finished_states=FINISHED,
        timeout=None,
        on_trial=lambda s, t: seen.append(t.state),
        stopped={"t2"},
        scheduler_name="asha",
    )
    for i in range(5):
        t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        t.report(0.5, 0)
        driver.live[f"t{i}"] = _ray_driver.Live(t._trial_id, t.number)
    driver.on_trial_complete(
        "t0", {"final": True, "optuna_state": "COMPLETE", "optuna_values": [0.75]}, False
    )
    driver.on_trial_complete("t1", None, True)
    driver.on_trial_complete("t2", {"step": 0, "value": 0.5}, False)
    driver.on_trial_complete("t3", {"step": 0, "value": 0.5}, False)
    driver.on_trial_complete("t4", {"final": True, "optuna_state": "PRUNED"}, False)
    driver.on_trial_complete("t4", None, True)  # a second notice changes nothing
    assert driver.error is None
    t0, t1, t2, t3, t4, rerun = study.get_trials()
    assert (t0.state, t0.value) == (TrialState.COMPLETE, 0.75)
    assert t1.state == TrialState.FAIL and "Ray worker" in t1.user_attrs["fail_reason"]
    assert t1.user_attrs["fail_kind"] == "died"
    assert rerun.state == TrialState.WAITING and rerun.user_attrs["retry_of"] == t1.number
    assert rerun.system_attrs["fixed_params"] == t1.params
    assert t2.state == TrialState.PRUNED
    assert t2.user_attrs["pruned_by"] == "asha" and t2.user_attrs["pruned_at_step"] == 0
    assert t3.state == TrialState.FAIL and "stopped" in t3.user_attrs["fail_reason"]
    assert t4.state == TrialState.PRUNED
    assert seen == [t.state for t in (t0, t1, t2, t3, t4)]
    assert not driver.live


def _driver_with_one_trial(fail_kind: str | None = None):
    study = optuna.create_study(direction="maximize")
    driver = _ray_driver.Driver(
        study,
        None,
        target=9,
        finished_states=FINISHED,
        timeout=None,
        on_trial=None,
        stopped=set(),
        scheduler_name=None,
    )
    t = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    if fail_kind:
        t.set_user_attr("fail_reason", "OSError: NFS hiccup")
        t.set_user_attr("fail_kind", fail_kind)
    driver.live["t0"] = _ray_driver.Live(t._trial_id, t.number)
    return study, driver


def test_transient_failure_on_a_ray_worker_is_rerun_with_its_parameters():
    study, driver = _driver_with_one_trial("transient")
    driver.on_trial_complete("t0", {"final": True, "optuna_state": "FAIL"}, False)
    failed, rerun = study.get_trials()
    assert failed.state == TrialState.FAIL
    assert rerun.state == TrialState.WAITING and rerun.user_attrs["retry_of"] == 0
    assert rerun.system_attrs["fixed_params"] == failed.params

    study, driver = _driver_with_one_trial("error")  # a plain error is not re-run
    driver.on_trial_complete("t0", {"final": True, "optuna_state": "FAIL"}, False)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


def test_worker_setup_errors_are_reported_as_what_they_are(tmp_path):
    """The worker's data missing, or the study out of its reach (the worker cannot write the
    reason itself: its last report carries it), or an import error on that node: FAIL with
    that reason, not "the worker died", and not re-run."""
    from automl_cxr.errors import DataError
    from automl_cxr.study import get_profile, load_space
    from automl_cxr.study._ray import _worker as _ray_worker

    job = _ray_worker.Job(
        storage_url="sqlite:///unused.db",
        study_name="s",
        dataset="three_class",
        dataset_hash="x",
        data_dir=str(tmp_path / "not-on-this-node"),
        max_per_class=None,
        seed=0,
        space=load_space(None),
        profile=get_profile("smoke"),
        objectives=["balanced_accuracy"],
        pruner="none",
        max_resource=4,
        cpus=1,
        gpus=0.0,
        feature_cache_bytes=0,
        feature_cache_dir=None,
        cwd=str(tmp_path),
    )
    with pytest.raises(DataError) as info:
        _ray_worker._worker_objective(job, "cpu")
    reason = _ray_worker._setup_reason(info.value)
    assert reason.startswith("setup failed on the Ray worker on ") and "DataError" in reason
    assert "not-on-this-node" in reason

    study, driver = _driver_with_one_trial()
    final = {"final": True, "optuna_state": "FAIL", "fail_reason": reason, "fail_kind": "setup"}
    driver.on_trial_complete("t0", final, False)
    (t,) = study.get_trials()
    assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == reason

    study, driver = _driver_with_one_trial()
    driver.errors["t0"] = ModuleNotFoundError("No module named 'automl_cxr'")
    driver.on_trial_complete("t0", None, True)
    (t,) = study.get_trials()
    assert "ModuleNotFoundError: No module named 'automl_cxr'" in t.user_attrs["fail_reason"]
    assert t.user_attrs["fail_kind"] == "setup"
    # Ray losing the worker (its node, its memory) is a death, and re-run.
    died = ray.exceptions.NodeDiedError("node 1 died")
    assert _ray_driver.describe_tune_error(died)[1] == "died"
    assert _ray_driver.describe_tune_error(None)[1] == "died"


def test_asha_needs_one_objective_and_spans_every_step():
    from automl_cxr.study import get_profile, load_space

    profile, space = get_profile("smoke"), load_space(None)
    multi = SearchSettings(
        dataset="three_class",
        trials=1,
        data_dir=".",
        objectives=["accuracy", "latency"],
        backend="ray",
    )
    with pytest.raises(ConfigError, match="single objective"):
        ray_backend.make_scheduler("asha", multi, profile, space)
    single = SearchSettings(dataset="three_class", trials=1, data_dir=".", backend="ray")
    asha = ray_backend.make_scheduler("asha", single, profile, space)
    assert asha._max_t == 4 == ray_backend.max_steps(profile, space)  # 2 folds x 2 epochs
    assert ray_backend.make_scheduler(None, single, profile, space) is None


def test_two_concurrent_trials_keep_the_local_record(prepared_dir, tmp_path):
    assert not ray.is_initialized()
    seen: list[optuna.trial.FrozenTrial] = []
    db = str(tmp_path / "ray.db")
    summary = run_search(
        SearchSettings(
            dataset="three_class",
            trials=6,
            data_dir=prepared_dir,
            storage=db,
            profile="smoke",
            backend="ray",
            workers=2,
        ),
        on_trial=lambda study, t: seen.append(t),
    )
    assert not ray.is_initialized(), "run_ray must shut down the Ray instance it started"

    trials = _load(db, summary.study_name).get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 6
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sorted(t.number for t in seen) == sorted(t.number for t in trials)
    assert all(t.state.is_finished() for t in seen)
    for t in finished:
        assert t.params, "parameters are sampled into the study"
        assert t.intermediate_values, f"trial {t.number} has no intermediate values"
        assert t.user_attrs["ray_resources"]["cpus"] >= 1
        assert t.user_attrs["ray_resources"]["device"] == "cpu"
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    assert complete, "at least the first trial to reach each rung completes"
    for t in complete:
        assert set(t.user_attrs) >= RESULT_KEYS, RESULT_KEYS - set(t.user_attrs)
        assert t.value == pytest.approx(t.user_attrs["balanced_accuracy"])
        assert t.user_attrs["fail_reason"] is None
        assert len(t.intermediate_values) == 4  # 2 folds x 2 epochs

    # Two trials ran at the same time, in two Ray worker processes. Which two depends on
    # when each worker finished starting (one that imports torch late runs its first trial
    # after the other's), so any pair may show it. Six trials, not three: with three, a
    # fresh-clone CI run once saw one worker run all of them (a pruned smoke trial takes a
    # quarter of a second) before the other had started.
    assert all(t.user_attrs["worker"]["pid"] != os.getpid() for t in finished)
    windows = {t.number: _window(t) for t in finished}
    pids = {t.number: t.user_attrs["worker"]["pid"] for t in finished}
    overlapping = [
        (i, j)
        for i, j in itertools.combinations(sorted(windows), 2)
        if windows[i][0] < windows[j][1] and windows[j][0] < windows[i][1] and pids[i] != pids[j]
    ]
    assert overlapping, f"no two trials overlapped in two workers: {windows}, pids {pids}"

    # The same user attributes as a local run (plus where Ray placed the trial).
    local_db = str(tmp_path / "local.db")
    local = run_search(
        SearchSettings(
            dataset="three_class",
            trials=1,
            data_dir=prepared_dir,
            storage=local_db,
            profile="smoke",
            pruner="none",
        )
    )
    (lt,) = _load(local_db, local.study_name).get_trials()
    assert lt.state == TrialState.COMPLETE
    for t in complete:
        assert set(t.user_attrs) - set(lt.user_attrs) == {"ray_resources"}
        assert set(lt.user_attrs) <= set(t.user_attrs)
        assert set(t.user_attrs["worker"]) >= set(lt.user_attrs["worker"])


@pytest.fixture(scope="module")
def logical_gpus():
    """One Ray instance declaring 4 GPUs that do not exist (CUDA is absent here)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_fractional_gpus_fall_back_to_cpu_and_asha_stops_become_pruned(
    logical_gpus, prepared_dir, tmp_path, monkeypatch
):
    """Placement on logical GPUs (0.5 each), and a trial stopped by ASHA ends PRUNED.

    ASHA is forced to stop trial 1 at its first report, so the test does not depend on which
    configuration happens to score worse; every other decision is the real ASHA's (trial 0,
    alone at its rung, runs to the end).
    """
    real = ray_backend.RecordingASHA.on_trial_result

    def on_trial_result(self, controller, trial, result):
        if trial.config.get("optuna_number") == 1 and not result.get("final"):
            self.stopped.add(trial.trial_id)
            return self.STOP
        return real(self, controller, trial, result)

    monkeypatch.setattr(ray_backend.RecordingASHA, "on_trial_result", on_trial_result)
    db = str(tmp_path / "gpu.db")
    summary = run_search(
        SearchSettings(
            dataset="three_class",
            trials=2,
            data_dir=prepared_dir,
            storage=db,
            profile="smoke",
            backend="ray",
            workers=2,
            gpus_per_trial=0.5,
            scheduler="asha",
            pruner="none",
        )
    )
    assert ray.is_initialized(), "a Ray instance the caller started stays up"
    assert ray.cluster_resources().get("GPU") == 4

    trials = _load(db, summary.study_name).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    for t in trials:
        placed = t.user_attrs["ray_resources"]
        assert placed["gpus"] == 0.5
        assert placed["gpu_ids"], f"trial {t.number} got no GPU assignment: {placed}"
        assert placed["device"] == "cpu", "no CUDA here: the CPU fallback must be used"
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["device"] == "cpu"
            assert len(t.intermediate_values) == 4
        else:  # only ASHA prunes here (pruner none)
            assert t.user_attrs["pruned_by"] == "asha"
            assert len(t.intermediate_values) < 4
            assert "accuracy" not in t.user_attrs

    stopped = next(t for t in trials if t.number == 1)
    assert stopped.state == TrialState.PRUNED
    assert stopped.user_attrs["pruned_at_step"] == 0
    assert stopped.user_attrs["fail_reason"] is None


# -- a real cluster: two Ray nodes on loopback, the study on PostgreSQL ------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> set[int]:
    """`root` and every process below it (from /proc), to tear a node down by process id."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


class _RayNode:
    """One `ray start --block` process (its own session) and what it runs."""

    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_started(self, timeout: float = 180) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if "Ray runtime started" in self.log.read_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"Ray node did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The node's whole process tree, by process id (never by name: other Ray instances
        may run on this machine)."""
        pids = _descendants(self.proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        self.kill(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)


@dataclass
class _Cluster:
    address: str
    env: dict  # what a driver (`automl-cxr search --address ...`) needs: token auth
    head: _RayNode
    worker: _RayNode
    root: Path


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a worker node, each `--num-cpus 1 --num-gpus 1` (logical GPUs: the trials
    fall back to the CPU), started with token authentication exactly as the README's "Running
    on a cluster" says; torn down by process id at the end, pass or fail."""
    root = Path(tempfile.mkdtemp(prefix="acx-ray-"))  # short: Ray's socket paths have a limit
    ray_cli = str(Path(sys.executable).with_name("ray"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base |= {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    head_home = root / "head-home"  # the head machine's ~ (the test leaves the real ~ alone)
    head_home.mkdir()
    head_env = {**base, "HOME": str(head_home), "RAY_AUTH_MODE": "token"}
    subprocess.run(
        [ray_cli, "get-auth-token", "--generate"],
        env=head_env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    token = head_home / ".ray" / "auth_token"  # copied to each worker machine
    assert token.is_file()
    token_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "1"]
    head = worker = None
    try:
        head = _RayNode(
            [
                ray_cli,
                "start",
                "--head",
                "--port",
                str(port),
                *node,
                "--include-dashboard",
                "false",
                "--dashboard-port",
                str(_free_port()),
                "--dashboard-agent-listen-port",
                str(_free_port()),
                "--temp-dir",
                str(root / "ray"),  # not /tmp/ray: other Ray instances must not find this one
                "--disable-usage-stats",
                "--block",
            ],
            head_env,
            root / "head.log",
        )
        head.wait_started()
        worker = _RayNode(
            [
                ray_cli,
                "start",
                "--address",
                address,
                *node,
                "--dashboard-agent-listen-port",
                str(_free_port()),
                "--disable-usage-stats",
                "--block",
            ],
            token_env,
            root / "worker.log",
        )
        worker.wait_started()
        yield _Cluster(address, token_env, head, worker, root)
    finally:
        for n in (worker, head):
            if n is not None:
                n.stop()
        shutil.rmtree(root, ignore_errors=True)


def _postgres_url() -> str:
    url = os.environ.get("AUTOML_CXR_TEST_POSTGRES")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide AUTOML_CXR_TEST_POSTGRES (.ci/run starts the server)")
        pytest.skip("AUTOML_CXR_TEST_POSTGRES not set (.ci/run starts a PostgreSQL server)")
    return url


def _search(cluster: _Cluster, *args: str) -> subprocess.Popen:
    env = {**cluster.env, "PYTHONUNBUFFERED": "1", "AUTOML_CXR_TEST_THREADS": "1"}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "automl_cxr", "search", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.postgres
def test_two_node_cluster_on_postgresql_survives_a_lost_node(
    ray_cluster: _Cluster, prepared_dir: Path, tmp_path: Path
) -> None:
    from automl_cxr.study._recovery import MAX_RETRIES

    url = _postgres_url()
    common = ["--dataset", "three_class", "--profile", "smoke", "--data-dir", str(prepared_dir)]
    cluster = ["--backend", "ray", "--address", ray_cluster.address]

    # Without the cluster's token: a clear error that says what to set.
    no_token = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH")}
    p = _search(
        _Cluster(ray_cluster.address, no_token, ray_cluster.head, ray_cluster.worker, tmp_path),
        *common,
        "--trials",
        "1",
        "--storage",
        url,
        "--study-name",
        f"no-token-{os.getpid()}",
        *cluster,
    )
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "rejected this process's (missing) token" in err, err[-3000:]
    assert "RAY_AUTH_MODE=token" in err
    assert "Traceback" not in err and "gcs_client" not in err  # Ray's retries: in its log

    # A storage the other node cannot reach is refused before any trial starts.
    db = tmp_path / "local.db"
    p = _search(ray_cluster, *common, "--trials", "1", "--storage", str(db), *cluster)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    assert "PostgreSQL" in err or "postgresql://" in err, err[-3000:]
    assert "Traceback" not in err
    assert not _load(str(db), "three_class-smoke").get_trials()

    # Thirty epochs per fold on images: a trial lasts long enough to lose its node in the middle
    # of it. (With twelve, a fresh-clone CI run saw all four trials finish between two polls;
    # with thirty, one whose trials drew cached frozen features, which train in milliseconds
    # an epoch: augmentation keeps every trial on the images, not on cached features.)
    space = tmp_path / "slow.yaml"
    epochs, folds = 30, 2  # the smoke profile's two folds; long enough to be caught mid-trial
    default = (REPO / "studies" / "default.yaml").read_text()
    assert "augment: [0.0, 0.0, 0.3]" in default
    slow = default.replace("augment: [0.0, 0.0, 0.3]", "augment: [0.3]")
    space.write_text(slow + f"\nepochs: {epochs}\n")
    name = f"cluster-{os.getpid()}-{time.time_ns()}"
    proc = _search(
        ray_cluster,
        *common,
        "--trials",
        "4",
        "--storage",
        url,
        "--study-name",
        name,
        *cluster,
        "--workers",
        "2",
        "--cpus-per-trial",
        "1",
        "--gpus-per-trial",
        "0.5",
        "--pruner",
        "none",
        "--space",
        str(space),
    )
    killed = None
    try:
        t0 = time.time()
        while killed is None:
            assert time.time() - t0 < 300, "no trial ran on the worker node"
            assert proc.poll() is None, f"search ended early: {proc.stderr.read()[-3000:]}"
            time.sleep(0.5)
            with contextlib.suppress(Exception):  # the study may not exist yet
                study = optuna.load_study(study_name=name, storage=url)
                on_worker = _descendants(ray_cluster.worker.proc.pid)
                for t in study.get_trials(states=(TrialState.RUNNING,)):
                    pid = (t.user_attrs.get("process") or {}).get("pid")
                    steps = t.intermediate_values
                    # Mid-trial on that node, two epochs or more from its end: once the last
                    # epoch is reported the worker may already have handed its result over,
                    # and the driver then records the trial as complete despite the kill.
                    if pid in on_worker and steps and max(steps) < folds * epochs - 3:
                        killed = t.number
                        ray_cluster.worker.kill()
                        break
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]

    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))), "a trial was lost or duplicated"
    assert [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)] == []
    assert sum(t.state in FINISHED for t in trials) == 4  # exactly as asked
    placed = [t.user_attrs["ray_resources"] for t in trials if "ray_resources" in t.user_attrs]
    assert len({p["node"] for p in placed}) >= 2, f"trials ran on one node: {placed}"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # logical GPUs without CUDA
    assert all(p["gpus"] == 0.5 and p["device"] == device for p in placed), placed

    lost = trials[killed]
    assert lost.state == TrialState.FAIL
    assert "Ray worker running this trial died" in lost.user_attrs["fail_reason"]
    reruns = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(reruns) == 1 and reruns[0].params == lost.params
    assert reruns[0].state in FINISHED
    assert all(t.user_attrs.get("retries", 0) <= MAX_RETRIES for t in trials)
    fresh = [tuple(sorted(t.params.items())) for t in trials if "retry_of" not in t.user_attrs]
    assert len(fresh) == len(set(fresh)), "two parallel trials drew one configuration"

    # The console shows our lines only; Ray's own messages are in the log file it names.
    assert "Traceback" not in err and "tune_controller" not in err, err[-3000:]
    assert "Raylet is terminated" not in err and "(raylet)" not in err, err[-3000:]
    assert f"trial {killed} FAIL" in err
    log_line = next(line for line in err.splitlines() if "Ray's own messages go to" in line)
    ray_log = Path(log_line.split("go to ", 1)[1].split(" (", 1)[0])
    assert ray_log.is_file() and ray_log.stat().st_size > 0
