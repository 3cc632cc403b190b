"""`automl-cxr search`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from automl_cxr.cli import app
from automl_cxr.cli._common import err_console, out_console, parse_key_values
from automl_cxr.settings import resolve_data_dir


def _fmt_params(params: dict) -> str:
    parts = []
    for k, v in params.items():
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


class _ProgressView:
    """Live view: trials done/total, best so far with its configuration, elapsed, ETA."""

    def __init__(self, total: int, metric: str, enabled: bool) -> None:
        self.total, self.metric, self.enabled = total, metric, enabled
        self.start = time.time()
        self.done_at_start: int | None = None
        self.live: Live | None = None

    def table(self, study) -> Table:
        from automl_cxr.study import FINISHED

        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in FINISHED for t in trials)
        if self.done_at_start is None:
            self.done_at_start = done
        failed = sum(t.state.name == "FAIL" for t in trials)
        pruned = sum(t.state.name == "PRUNED" for t in trials)
        elapsed = time.time() - self.start
        ran = done - self.done_at_start
        eta = (elapsed / ran) * (self.total - done) if ran else float("nan")
        t = Table.grid(padding=(0, 2))
        t.add_row("trials", f"{done}/{self.total} finished ({pruned} pruned, {failed} failed)")
        try:
            if len(study.directions) == 1:
                b = study.best_trial
                t.add_row(f"best {self.metric}", f"{b.value:.4f} (trial {b.number})")
                t.add_row("best config", _fmt_params(b.params))
        except ValueError:
            t.add_row(f"best {self.metric}", "-")
        t.add_row("elapsed", f"{elapsed:,.0f} s")
        t.add_row("remaining", "-" if eta != eta else f"~{eta:,.0f} s")
        return t

    def on_trial(self, study, trial) -> None:
        value = (
            f"{trial.value:.4f}"
            if trial.values and len(trial.values) == 1
            else str(trial.values)
            if trial.values
            else "-"
        )
        reason = trial.user_attrs.get("fail_reason")
        line = f"trial {trial.number} {trial.state.name} {value} [{_fmt_params(trial.params)}]"
        if reason:
            line += f" — {reason}"
        if self.enabled:
            err_console.print(line, highlight=False, markup=False)
            if self.live is not None:
                self.live.update(self.table(study))


@app.command("search")
def search(
    dataset: Annotated[
        str, typer.Option(help="Prepared dataset: three_class, four_class, binary…")
    ],
    trials: Annotated[int, typer.Option(help="Finished trials the study holds at the end.")],
    storage: Annotated[
        str | None,
        typer.Option(help="SQLite path or Optuna storage URL (default: studies/<dataset>.db)."),
    ] = None,
    study_name: Annotated[str | None, typer.Option(help="(default: <dataset>-<profile>)")] = None,
    space: Annotated[
        Path | None,
        typer.Option(
            help="Search space YAML, or a built-in space's name: default, cpu, robust, "
            "paper_three_class, paper_four_class, paper_binary (default: the profile's)."
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(help="smoke|demo|cpu|gpu|paper|paper-cpu (default: gpu with CUDA, else cpu)."),
    ] = None,
    metric: Annotated[
        str, typer.Option(help="Objective metric (maximised).")
    ] = "balanced_accuracy",
    objectives: Annotated[
        str | None, typer.Option(help="Several objectives, e.g. accuracy,latency (NSGA-II).")
    ] = None,
    sampler: Annotated[str, typer.Option(help="tpe|random|nsga2")] = "tpe",
    pruner: Annotated[str, typer.Option(help="hyperband|median|none")] = "hyperband",
    backend: Annotated[str, typer.Option(help="local|ray")] = "local",
    workers: Annotated[
        int | None,
        typer.Option(
            help="Parallel trials (default: the profile's; cpu: 2, one thread each, on 2+ cores)."
        ),
    ] = None,
    cpus_per_trial: Annotated[int | None, typer.Option(help="CPU threads per trial.")] = None,
    cpu_amp: Annotated[
        bool | None,
        typer.Option(
            "--cpu-amp/--no-cpu-amp",
            help="bfloat16 autocast on a CPU that computes it natively (AVX512-BF16/AMX); "
            "default: the profile's (cpu: on).",
        ),
    ] = None,
    gpus_per_trial: Annotated[
        float | None, typer.Option(help="GPUs per trial (Ray; fractions ok).")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local Ray instance).")
    ] = None,
    scheduler: Annotated[str | None, typer.Option(help="Ray Tune scheduler: asha.")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Stop starting trials after SECONDS.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    data_dir: Annotated[
        Path | None, typer.Option(help="(default: $AUTOML_CXR_DATA or ./data)")
    ] = None,
    feature_cache_dir: Annotated[
        Path | None, typer.Option(help="Keep frozen features on disk here, across runs.")
    ] = None,
    enqueue: Annotated[
        list[str] | None,
        typer.Option(
            help="Run this configuration first, e.g. backbone=mobilenetv2_100,head=linear "
            "(repeatable; parameters left out are sampled; skipped if already in the study)."
        ),
    ] = None,
    cv: Annotated[
        str,
        typer.Option(
            help="What a validation fold holds out: patient (default) or site (whole "
            "acquisition sites the model never trained on)."
        ),
    ] = "patient",
    external: Annotated[
        list[Path] | None,
        typer.Option(
            help="External set (folder per class or CSV manifest) scored by each COMPLETE "
            "trial's fold models; repeatable; never used to choose anything."
        ),
    ] = None,
    external_label_map: Annotated[
        str | None,
        typer.Option(help="Map external labels onto the study's, e.g. NORMAL=normal,a=b."),
    ] = None,
    drop_overlap: Annotated[
        bool,
        typer.Option(
            "--drop-overlap",
            help="Leave out external images that are a copy of a training image or a film of "
            "a training patient (listed in the study) instead of refusing the set.",
        ),
    ] = False,
    test: Annotated[
        str | None,
        typer.Option(
            "--test",
            help="Set aside a test split before anything else, whole patients or sites by the "
            "seed: patient:0.2 or site:0.2. The search never sees it; report and the model "
            "card show the best-by-CV trial's figure on it.",
        ),
    ] = None,
    trial_timeout: Annotated[
        float | None,
        typer.Option(
            "--trial-timeout",
            help="Seconds one trial may run; a longer one is stopped and marked FAIL with "
            "that reason (--timeout only stops starting new trials).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show Ray's own messages (default: a log file).")
    ] = False,
) -> None:
    """Search backbone, frozen depth, head and training options with Optuna."""
    import optuna

    from automl_cxr.study import SearchSettings, run_search

    # Our live view reports every trial; failed trials keep their traceback in user attrs.
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)

    settings = SearchSettings(
        dataset=dataset,
        trials=trials,
        data_dir=resolve_data_dir(data_dir),
        storage=storage,
        study_name=study_name,
        space=space,
        profile=profile,
        metric=metric,
        objectives=[o.strip() for o in objectives.split(",")] if objectives else None,
        sampler=sampler,
        pruner=pruner,
        backend=backend,
        workers=workers,
        cpu_amp=cpu_amp,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        address=address,
        scheduler=scheduler,
        timeout=timeout,
        seed=seed,
        feature_cache_dir=feature_cache_dir,
        enqueue=[parse_key_values([e], option="--enqueue") for e in enqueue or []],
        cv=cv,
        externals=[str(e) for e in external or []],
        external_label_map=(
            parse_key_values([external_label_map], option="--external-label-map")
            if external_label_map
            else None
        ),
        drop_overlap=drop_overlap,
        test=test,
        trial_timeout=trial_timeout,
        verbose=verbose,
    )
    view = _ProgressView(trials, settings.objectives[0], enabled=not quiet)
    try:
        with Live(
            console=err_console, refresh_per_second=2, transient=True, auto_refresh=not quiet
        ) as live:
            view.live = live if not quiet else None
            summary = run_search(
                settings,
                on_trial=view.on_trial,
                log=(lambda s: err_console.print(escape(s), highlight=False))
                if not quiet
                else None,
            )
    except KeyboardInterrupt:
        err_console.print(
            "[bold red]interrupted[/]: finished trials are saved; the running one is marked "
            "failed. Resume with the same command."
        )
        raise typer.Exit(130) from None
    out_console.print(
        f"study [bold]{summary.study_name}[/] in {summary.storage}: "
        + ", ".join(f"{v} {k.lower()}" for k, v in summary.counts.items())
        + f" ({summary.ran} new, {summary.seconds:.0f} s)",
        highlight=False,
    )
    if summary.best:
        out_console.print(
            f"best {settings.objectives[0]} {summary.best['value']:.4f} (trial "
            f"{summary.best['number']}): {_fmt_params(summary.best['params'])}",
            highlight=False,
        )
    for w in summary.warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)
