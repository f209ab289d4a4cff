"""The ``ragsweep`` command line. Flags and environment variables are read here and nowhere else.

Every command catches :class:`RagsweepError` once, prints one line saying what is wrong and how to
fix it, and exits with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

# transformers' GGUF conversion (SmolLM2, once per cache) draws a bare tqdm bar; tqdm reads this
# once, when something first imports it (Ray and the launch's own imports do, before any command
# body runs), so it is set here; --debug keeps the bars.
if "--debug" not in sys.argv:
    os.environ.setdefault("TQDM_DISABLE", "1")

import typer  # noqa: E402
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainers.config import METHODS
from trainers.errors import RagsweepError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Hyperparameter search for fine-tuning RAG pipelines.",
)
_console = Console()
_errors = Console(stderr=True)
_P = ParamSpec("_P")
_R = TypeVar("_R")

_SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Change one spec field: a dotted KEY=VALUE, the value in YAML "
        "(search.joint=cartesian, 'methods=[rag_token]'). Repeatable.",
    ),
]


@app.callback()
def _root() -> None:
    """Hyperparameter search for fine-tuning RAG pipelines."""


def _cache_dir() -> Path:
    return Path(os.environ.get("RAGSWEEP_CACHE", Path.home() / ".cache" / "ragsweep"))


def _one_line_errors(command: Callable[_P, _R]) -> Callable[_P, _R]:
    @wraps(command)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return command(*args, **kwargs)
        except RagsweepError as e:
            if "--debug" in sys.argv:
                raise
            _print_error(str(e))
            raise typer.Exit(2) from None

    return wrapper


def _print_error(message: str) -> None:
    # Escaped: messages quote user input such as [rag_token], which rich would read as markup.
    _errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    # Library progress bars and advice drown the one line a user needs; --debug keeps them.
    if "--debug" in sys.argv:
        return
    import logging
    import warnings

    import datasets
    import optuna
    import transformers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@app.command()
@_one_line_errors
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
    data_path: Annotated[
        str | None, typer.Option("--data-path", help="Override data.path (a local file).")
    ] = None,
    settings: _SetOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Save trained models and trial.json here.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print metrics and record as JSON.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and library logs.")
    ] = False,
) -> None:
    """Run one trial in this process and print its metrics."""
    from search.spec import load_spec, trial_config

    if method not in METHODS:
        raise _bad_choice("--method", method, METHODS)
    study = load_spec(spec, _spec_overrides(settings, {"data.path": data_path}))
    config = trial_config(
        study, method, lr_embedder=lr_embedder, lr_generator=lr_generator, seed=seed
    )
    _quiet_libraries()
    from trainers import run_trial

    result = run_trial(config, cache_dir=_cache_dir(), out_dir=out)
    if as_json:
        print(json.dumps({"metrics": result.metrics, "record": result.record}, indent=2))
        return
    _console.print(_metrics_table(method, result.metrics))


@app.command()
@_one_line_errors
def plan(
    spec: Annotated[Path, typer.Argument(help="Study spec YAML.")],
    settings: _SetOption = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Print the stages, trial counts, shared work and cost forecast of a study; runs nothing."""
    from search.plan import make_plan, render_plan
    from search.spec import load_spec

    study = load_spec(spec, _spec_overrides(settings, {}))
    _console.print(render_plan(make_plan(study), study))


@app.command()
@_one_line_errors
def launch(
    spec: Annotated[Path, typer.Argument(help="Study spec YAML.")],
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Optuna storage URL (default: RAGSWEEP_STORAGE, the spec's, or studies/<name>.db).",
        ),
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="An existing Ray cluster (default: local Ray).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Study name (default: the spec's).")
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", min=1, help="Trials at once (default: the spec's)."),
    ] = None,
    data_path: Annotated[
        str | None, typer.Option("--data-path", help="Override data.path (a local file).")
    ] = None,
    settings: _SetOption = None,
    runs_dir: Annotated[
        Path | None,
        typer.Option("--runs-dir", help="Checkpoints later stages reuse (default: studies/runs)."),
    ] = None,
    max_retries: Annotated[
        int, typer.Option("--max-retries", min=0, help="Retries of a trial whose worker died.")
    ] = 1,
    ray_logs: Annotated[
        bool, typer.Option("--ray-logs", help="Show Ray's and the workers' own output.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and library logs.")
    ] = False,
) -> None:
    """Run every stage of the study's plan on Ray; trials already complete are not re-run."""
    from search.dispatch import launch as run_launch
    from search.plan import make_plan
    from search.progress import LaunchProgress
    from search.spec import load_spec
    from search.store import mask_url

    overrides = {"name": name, "data.path": data_path, "concurrency": concurrency}
    study = load_spec(spec, _spec_overrides(settings, overrides))
    storage_url = _storage_url(storage, study.storage, spec.parent / f"{study.name}.db")
    _quiet_libraries()
    os.environ.setdefault(
        "RAY_TMPDIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "ragsweep-ray")
    )
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    plan = make_plan(study)
    first = study.objectives[0]
    _console.print(
        f"study [bold]{study.name}[/] -> {mask_url(storage_url)}  ({plan.total_trials} trials planned)"
    )
    try:
        with LaunchProgress(
            plan, first.metric, first.direction == "maximize", _console
        ) as progress:
            summary = run_launch(
                study,
                storage_url=storage_url,
                runs_dir=runs_dir or spec.parent / "runs",
                cache_dir=_cache_dir(),
                address=address,
                on_event=progress,
                max_retries=max_retries,
                log_to_driver=ray_logs,
            )
    except KeyboardInterrupt:
        # The same options matter (--data-path, --set, --storage): they decide the study.
        command = shlex.join(["ragsweep", *sys.argv[1:]])
        _print_error(
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
    _console.print(
        f"ran {ran} trials ({failed} failed), {skipped} already complete, in {summary.wall_s / 60:.1f} min"
    )
    abandoned = sum(summary.abandoned.values())
    if abandoned:
        _console.print(
            f"{abandoned} left running by a stopped launch were marked failed (retryable) and run again"
        )
    for stage, reason in summary.blocked.items():
        _errors.print(f"stage {stage} did not run: {reason}", highlight=False, soft_wrap=True)
    if summary.blocked:
        raise typer.Exit(1)


def _storage_url(explicit: str | None, from_spec: str | None, default_file: Path) -> str:
    """--storage, else RAGSWEEP_STORAGE, else the spec's storage, else a SQLite file beside the spec."""
    return (
        explicit
        or os.environ.get("RAGSWEEP_STORAGE")
        or from_spec
        or f"sqlite:///{default_file.resolve()}"
    )


def _spec_overrides(settings: list[str] | None, options: dict[str, object]) -> dict[str, object]:
    """Dotted spec overrides: each --set KEY=VALUE, then the dedicated options that were given."""
    import yaml

    from trainers.errors import ConfigError

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


def _bad_choice(option: str, value: str, choices: tuple[str, ...]) -> RagsweepError:
    from trainers.errors import ConfigError

    return ConfigError(f"{option} '{value}' is not one of: {', '.join(choices)}")


def _metrics_table(method: str, metrics: dict[str, float]) -> Table:
    table = Table(title=f"trial: {method}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    headline = [
        "em",
        "f1",
        "recall_at_k",
        "wall_s",
        "train_wall_s",
        "device_s",
        "tokens",
        "flops",
        "peak_mem_mb",
        "index_build_s",
        "index_cache_hit",
    ]
    for key in headline + sorted(k for k in metrics if "." in k):
        if key in metrics:
            value = metrics[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


# The query commands (studies, trials, best, pareto, compare, export, plot, reproduce, dashboard)
# live in their own module; importing it registers them on ``app``.
from search import _query_cli  # noqa: E402, F401


def main() -> None:
    """Console-script entry point; a mistyped option gets one line too, not a usage box."""
    try:
        code = app(standalone_mode=False, prog_name="ragsweep")
    except typer.Abort:
        _errors.print("aborted")
        raise SystemExit(1) from None
    except typer.TyperException as e:  # click's usage errors: bad option values, unknown commands
        message = (e.format_message() if hasattr(e, "format_message") else str(e)).rstrip(".")
        context = getattr(e, "ctx", None)
        command = context.command_path if context is not None else "ragsweep"
        if message:  # empty when no arguments were given: the help was printed already
            _print_error(f"{message}; see {command} --help")
        raise SystemExit(getattr(e, "exit_code", 2)) from None
    raise SystemExit(code if isinstance(code, int) else 0)
