"""The commands that plan and run: ``train`` (one trial here), ``plan`` (what a study would run
and cost), ``index`` (the study's corpus encoded and indexed on Ray) and ``launch`` (the whole
study on Ray). Their flags are read here; ``search.cli`` adds
:data:`app`'s commands to ``ragsweep``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from search.cli_common import (
    DebugOption,
    SetOption,
    bad_choice,
    cache_dir,
    console,
    error_console,
    one_line_errors,
    print_error,
    quiet_libraries,
    storage_url,
)
from trainers.config import METHODS
from trainers.errors import ConfigError, mask_secrets

app = typer.Typer()
# train, plan, index and launch read the same data the same way; plan forecasts what launch runs.
_DataPathOption = Annotated[
    str | None, typer.Option("--data-path", help="Override data.path (a local file).")
]
_ConcurrencyOption = Annotated[
    int | None, typer.Option("--concurrency", min=1, help="Trials at once (default: the spec's).")
]
_AddressOption = Annotated[
    str | None, typer.Option("--address", help="An existing Ray cluster (default: local Ray).")
]
_RayLogsOption = Annotated[
    bool, typer.Option("--ray-logs", help="Show Ray's and the workers' own output.")
]


@app.command()
@one_line_errors
def train(
    spec: Annotated[Path, typer.Option("--spec", help="Study spec YAML (studies/demo.yaml).")],
    method: Annotated[str, typer.Option("--method", help=f"One of: {', '.join(METHODS)}.")],
    lr_embedder: Annotated[
        float | None, typer.Option("--lr-embedder", help="Embedder learning rate.")
    ] = None,
    lr_generator: Annotated[
        float | None, typer.Option("--lr-generator", help="Generator learning rate.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Trial seed (default: the spec's).")
    ] = None,
    data_path: _DataPathOption = None,
    settings: SetOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Save trained models and trial.json here.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print metrics and record as JSON.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Run one trial in this process and print its metrics."""
    from search.spec import load_spec, trial_config

    if method not in METHODS:
        raise bad_choice("--method", method, METHODS)
    if out is not None:
        _check_folder_option("--out", out)
    study = load_spec(spec, _spec_overrides(settings, {"data.path": data_path}))
    config = trial_config(
        study, method, lr_embedder=lr_embedder, lr_generator=lr_generator, seed=seed
    )
    quiet_libraries(debug)
    from trainers import run_trial

    result = run_trial(config, cache_dir=cache_dir(), out_dir=out)
    if as_json:
        print(json.dumps({"metrics": result.metrics, "record": result.record}, indent=2))
        return
    console.print(_metrics_table(method, result.metrics))


@app.command()
@one_line_errors
def plan(
    spec: Annotated[Path, typer.Argument(help="Study spec YAML.")],
    concurrency: _ConcurrencyOption = None,
    data_path: _DataPathOption = None,
    settings: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Print the stages, trial counts, shared work and cost forecast of a study; runs nothing."""
    from search.plan import make_plan
    from search.plan_table import render_plan
    from search.spec import load_spec

    overrides = {"data.path": data_path, "concurrency": concurrency}
    study = load_spec(spec, _spec_overrides(settings, overrides))
    console.print(render_plan(make_plan(study, cache_dir=cache_dir()), study))


@app.command()
@one_line_errors
def index(
    spec: Annotated[Path, typer.Argument(help="Study spec YAML.")],
    address: _AddressOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=1, help="Encoder actors (default: one per GPU, else per CPU)."
        ),
    ] = None,
    shard_passages: Annotated[
        int | None,
        typer.Option(
            "--shard-passages",
            min=1,
            help="Passages a shard: the work a killed encode can lose (default: 65,536).",
        ),
    ] = None,
    data_path: _DataPathOption = None,
    settings: SetOption = None,
    ray_logs: _RayLogsOption = False,
    debug: DebugOption = False,
) -> None:
    """Encode the study's corpus on every worker of a Ray cluster and build its FAISS index into
    the cache (RAGSWEEP_CACHE, shared by the nodes); a killed run resumes from its last shard."""
    from search.launch._cluster import ray_session, start_ray
    from search.launch.dispatch import prepare_study
    from search.launch.progress import encode_reporter
    from search.plan import make_plan
    from search.spec import load_spec

    study = load_spec(spec, _spec_overrides(settings, {"data.path": data_path}))
    quiet_libraries(debug)
    _ray_environment()
    with ray_session():
        prepare_study(
            study,
            make_plan(study),
            cache_dir(),
            connect=lambda: start_ray(address, ray_logs),
            workers=workers,
            shard_passages=shard_passages,
            on_encode=encode_reporter(console),
            convert_generator=False,
        )
    console.print(f"index of study {study.name} ready in {cache_dir() / 'index'}")


@app.command()
@one_line_errors
def launch(
    spec: Annotated[Path, typer.Argument(help="Study spec YAML.")],
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Optuna storage URL (default: RAGSWEEP_STORAGE, the spec's, or studies/<name>.db).",
        ),
    ] = None,
    address: _AddressOption = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Study name (default: the spec's).")
    ] = None,
    concurrency: _ConcurrencyOption = None,
    data_path: _DataPathOption = None,
    settings: SetOption = None,
    runs_dir: Annotated[
        Path | None,
        typer.Option("--runs-dir", help="Checkpoints later stages reuse (default: studies/runs)."),
    ] = None,
    max_retries: Annotated[
        int, typer.Option("--max-retries", min=0, help="Retries of a trial whose worker died.")
    ] = 1,
    ray_logs: _RayLogsOption = False,
    debug: DebugOption = False,
) -> None:
    """Run every stage of the study's plan on Ray; trials already complete are not re-run."""
    from search.launch.dispatch import launch as run_launch
    from search.launch.progress import LaunchProgress, encode_reporter
    from search.plan import make_plan
    from search.spec import load_spec
    from search.store import mask_url

    overrides = {"name": name, "data.path": data_path, "concurrency": concurrency}
    study = load_spec(spec, _spec_overrides(settings, overrides))
    runs_dir = runs_dir or spec.parent / "runs"
    _check_folder_option("--runs-dir", runs_dir)
    url = storage_url(storage, study.storage, spec.parent / f"{study.name}.db")
    quiet_libraries(debug)
    _ray_environment()
    # Ctrl-C must stop a launch. A process inherits its parent's blocked signals: started from a
    # process that had SIGINT blocked (a pytest-xdist worker, after earlier tests had loaded their
    # libraries), the launch left Ctrl-C pending and ran to its end. Unblocked, not un-ignored: a
    # shell ignores SIGINT for its background jobs on purpose.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    plan = make_plan(study)
    first = study.objectives[0]
    progress = LaunchProgress(plan, first.metric, first.direction == "maximize", console)

    def show_progress() -> None:
        # Only once every check has passed: a refused launch prints its one error line alone.
        console.print(
            f"study [bold]{study.name}[/] -> {mask_url(url)}  ({plan.total_trials} trials planned)"
        )
        shown.enter_context(progress)

    try:
        with ExitStack() as shown:
            summary = run_launch(
                study,
                storage_url=url,
                runs_dir=runs_dir,
                cache_dir=cache_dir(),
                address=address,
                on_event=progress,
                on_ready=show_progress,
                on_encode=encode_reporter(console),
                max_retries=max_retries,
                log_to_driver=ray_logs,
            )
    except KeyboardInterrupt:
        # The same options matter (--data-path, --set, --storage): they decide the study.
        command = mask_secrets(shlex.join(["ragsweep", *sys.argv[1:]]))
        print_error(
            "interrupted: completed trials are kept, the running ones are marked failed "
            f"(retryable); launch {spec} again with the same options to finish the study: "
            f"{command}"
        )
        raise typer.Exit(130) from None
    ran, failed, skipped = (
        sum(summary.ran.values()),
        sum(summary.failed.values()),
        sum(summary.skipped.values()),
    )
    pruned = sum(summary.pruned.values())
    stopped = f", {pruned} stopped early" if pruned else ""
    console.print(
        f"ran {ran} trials ({failed} failed{stopped}), {skipped} already complete, in "
        f"{summary.wall_s / 60:.1f} min"
    )
    abandoned = sum(summary.abandoned.values())
    if abandoned:
        console.print(
            f"{abandoned} left running by a stopped launch were marked failed (retryable) and run "
            "again, each from its last resume point if it saved one"
        )
    for stage, reason in summary.blocked.items():
        error_console.print(f"stage {stage} did not run: {reason}", highlight=False, soft_wrap=True)
    if summary.blocked:
        raise typer.Exit(1)


def _ray_environment() -> None:
    """Where a local Ray keeps its files, and Tune's output kept to what ragsweep shows."""
    os.environ.setdefault(
        "RAY_TMPDIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "ragsweep-ray")
    )
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def _check_folder_option(option: str, folder: Path) -> None:
    """Refuse an output folder that is a file, or lies under one, before anything runs."""
    for path in (folder, *folder.absolute().parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(
                    f"{option} {folder}: {path} is a file, not a folder; give a folder"
                )
            return


def _spec_overrides(settings: list[str] | None, options: Mapping[str, object]) -> dict[str, object]:
    """Dotted spec overrides: each --set KEY=VALUE, then the dedicated options that were given."""
    import yaml

    overrides: dict[str, object] = {}
    for setting in settings or []:
        key, equals, value = setting.partition("=")
        if not equals or not key.strip():
            raise ConfigError(
                f"--set '{setting}' is not KEY=VALUE; write e.g. --set search.joint=cartesian"
            )
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {key.strip()}: '{value}' is not a YAML value; quote lists, e.g. "
                "--set 'methods=[rag_token]'"
            ) from e
    return overrides | {key: value for key, value in options.items() if value is not None}


def _metrics_table(method: str, metrics: dict[str, float]) -> Table:
    table = Table(title=f"trial: {method}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    from search.store import HEADLINE_METRICS

    for key in [*HEADLINE_METRICS, *sorted(k for k in metrics if "." in k)]:
        if key in metrics:
            value = metrics[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table
