"""The ``ragsweep`` command line. Flags and environment variables are read here and nowhere else.

Every command catches :class:`RagsweepError` once, prints one line saying what is wrong and how to
fix it, and exits with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
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
            _errors.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_libraries() -> None:
    # Library progress bars and advice drown the one line a user needs; --debug keeps them.
    if "--debug" in sys.argv:
        return
    import logging

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
    study = load_spec(spec, {"data.path": data_path} if data_path else None)
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
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Print the stages, trial counts, shared work and cost forecast of a study; runs nothing."""
    from search.plan import make_plan, render_plan
    from search.spec import load_spec

    study = load_spec(spec)
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

    overrides: dict[str, object] = {}
    if name:
        overrides["name"] = name
    if data_path:
        overrides["data.path"] = data_path
    if concurrency:
        overrides["concurrency"] = concurrency
    study = load_spec(spec, overrides)
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
    with LaunchProgress(plan, first.metric, first.direction == "maximize", _console) as progress:
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


def _storage_url(explicit: str | None, from_spec: str | None, default_file: Path) -> str:
    """--storage, else RAGSWEEP_STORAGE, else the spec's storage, else a SQLite file beside the spec."""
    return (
        explicit
        or os.environ.get("RAGSWEEP_STORAGE")
        or from_spec
        or f"sqlite:///{default_file.resolve()}"
    )


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


# --- queries: what a study database holds ---------------------------------------------------------

_StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage URL (default: RAGSWEEP_STORAGE, else studies/<study>.db if it exists).",
    ),
]
_FormatOption = Annotated[str, typer.Option("--format", help="table, json or csv.")]
_DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
_StudyArgument = Annotated[
    str,
    typer.Argument(help="Study name (the spec's name), or one stage study such as demo/ft_gen."),
]
_FORMATS = ("table", "json", "csv")
_TRIAL_COLUMNS = [
    "trial",
    "method",
    "state",
    "lr_embedder",
    "lr_generator",
    "em",
    "f1",
    "recall_at_k",
    "train_flops",
    "train_device_s",
    "fail_reason",
]


@app.command()
@_one_line_errors
def studies(
    storage: _StorageOption = None, fmt: _FormatOption = "table", debug: _DebugOption = False
) -> None:
    """Every study in the database: methods, trials by state, best F1 and compute spent."""
    from search._views import studies_records
    from search.report import summarize_studies
    from search.store import mask_url

    url = _query_url(storage, None)
    records = studies_records(summarize_studies(_open_existing(url)))
    columns = [
        "study",
        "methods",
        "complete",
        "failed",
        "running",
        "best_f1",
        "train_flops",
        "train_device_s",
    ]
    _emit(records, fmt, f"studies in {mask_url(url)}", columns)


@app.command()
@_one_line_errors
def trials(
    study: _StudyArgument,
    method: Annotated[str | None, typer.Option("--method", help="Only this method.")] = None,
    state: Annotated[
        str | None, typer.Option("--state", help="complete, fail, running, waiting or pruned.")
    ] = None,
    sort: Annotated[
        str | None,
        typer.Option(
            "--sort",
            help="f1, em, recall_at_k (best first), a cost such as train_flops (lowest first), lr_embedder, ...",
        ),
    ] = None,
    storage: _StorageOption = None,
    fmt: _FormatOption = "table",
    debug: _DebugOption = False,
) -> None:
    """One row per trial: learning rates, EM, F1, Recall@k, cost, state and why it failed."""
    from search._views import trial_record
    from search.report import select_trials

    report = _load_report(study, storage)
    rows = select_trials(report, method=method, state=state, sort=sort)
    records = [trial_record(report, row) for row in rows]
    _emit(records, fmt, f"study {report.name}: {len(records)} trials", _TRIAL_COLUMNS)


@app.command()
@_one_line_errors
def best(
    study: _StudyArgument,
    metric: Annotated[str, typer.Option("--metric", help="f1, em or recall.")] = "f1",
    method: Annotated[str | None, typer.Option("--method", help="Only this method.")] = None,
    storage: _StorageOption = None,
    fmt: _FormatOption = "table",
    debug: _DebugOption = False,
) -> None:
    """The best completed trial on a validation metric, with everything recorded about it."""
    from search._views import as_json, trial_record
    from search.report import best_of, export_rows

    _check_format(fmt, ("table", "json"))
    report = _load_report(study, storage)
    row = best_of(report, metric, method)
    if fmt == "json":
        everything = next(r for r in export_rows(report) if r["trial"] == row.id)
        print(as_json(everything | {"run_flops": trial_record(report, row)["run_flops"]}))
        return
    _console.print(_trial_detail(report, row, f"best trial of {report.name} on {metric}"))


@app.command()
@_one_line_errors
def pareto(
    study: _StudyArgument,
    cost: Annotated[
        str,
        typer.Option(
            "--cost", help="train_flops, train_device_s, train_wall_s, wall_s, peak_mem_mb, ..."
        ),
    ] = "train_flops",
    metric: Annotated[str, typer.Option("--metric", help="f1, em or recall.")] = "f1",
    storage: _StorageOption = None,
    fmt: _FormatOption = "table",
    debug: _DebugOption = False,
) -> None:
    """The trials no other trial beats on both quality and cost, across methods, cheapest first."""
    from search.report import pareto_front

    report = _load_report(study, storage)
    points, front = pareto_front(report, metric=metric, cost=cost)
    records = [
        {
            "trial": row.id,
            "method": row.method,
            "lr_embedder": row.lr_embedder,
            "lr_generator": row.lr_generator,
            metric: value,
            cost: price,
        }
        for row, value, price in front
    ]
    title = f"study {report.name}: {len(front)} of {len(points)} completed trials on the {metric}-{cost} front"
    _emit(records, fmt, title, ["trial", "method", "lr_embedder", "lr_generator", metric, cost])


@app.command()
@_one_line_errors
def compare(
    study: _StudyArgument,
    storage: _StorageOption = None,
    fmt: _FormatOption = "table",
    debug: _DebugOption = False,
) -> None:
    """The paper's table: each method's chosen run, its cost and its search's cost, and advice."""
    from search._views import compare_records
    from search.compare import compare as compare_methods

    _check_format(fmt, _FORMATS)
    report = _load_report(study, storage)
    comparison = compare_methods(report)
    records = compare_records(comparison)
    if fmt != "table":
        _emit(records, fmt, "", [])
        return
    columns = [
        "method",
        "lr_embedder",
        "lr_generator",
        "em",
        "f1",
        "recall_at_k",
        "run_flops",
        "run_device_s",
        "search_stages",
        "search_device_s",
    ]
    _emit(records, fmt, f"study {report.name}: methods at their best validation run", columns)
    _console.print(
        f"whole study: {comparison.total_trials} trials, "
        f"{_cell('flops', comparison.total_flops)}FLOPs, {_cell('_s', comparison.total_device_s)} of training"
        " (shared stages counted once)"
    )
    for note in comparison.notes:
        _console.print(f"note: {note}", highlight=False)
    for line in comparison.recommendation:
        _console.print(f"[bold]advice:[/] {line}", highlight=False)


@app.command()
@_one_line_errors
def export(
    study: _StudyArgument,
    out: Annotated[Path, typer.Option("-o", "--out", help="A .json or .csv file.")],
    storage: _StorageOption = None,
    debug: _DebugOption = False,
) -> None:
    """Every trial with every recorded attribute, to JSON or CSV (by the file's suffix)."""
    from search._views import as_csv, as_json
    from search.report import export_rows

    if out.suffix.lower() not in (".json", ".csv"):
        raise _bad_suffix(out, (".json", ".csv"))
    report = _load_report(study, storage)
    rows = export_rows(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(as_json(rows) if out.suffix.lower() == ".json" else as_csv(rows))
    _console.print(f"wrote {len(rows)} trials of {report.name} to {out}")


@app.command()
@_one_line_errors
def plot(
    study: _StudyArgument,
    out: Annotated[Path, typer.Option("-o", "--out", help="A .png, .svg or .pdf file.")],
    metric: Annotated[str, typer.Option("--metric", help="f1, em or recall.")] = "f1",
    cost: Annotated[
        str, typer.Option("--cost", help="train_flops, train_device_s, ...")
    ] = "train_flops",
    storage: _StorageOption = None,
    debug: _DebugOption = False,
) -> None:
    """Quality against cost for every trial (front marked), and heat maps of coupled LR grids."""
    from search.plots import plot_study

    report = _load_report(study, storage)
    _console.print(f"wrote {plot_study(report, out, metric=metric, cost=cost)}")


@app.command()
@_one_line_errors
def reproduce(
    study: _StudyArgument,
    trial: Annotated[
        str | None, typer.Option("--trial", help="<stage>/<number> as `ragsweep trials` shows.")
    ] = None,
    best_trial: Annotated[bool, typer.Option("--best", help="The best trial on F1.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Save the trained embedder and generator here.")
    ] = None,
    merged: Annotated[
        bool, typer.Option("--merged", help="Also save the generator with its adapter merged in.")
    ] = False,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance", min=0.0, help="Largest accepted |difference| of EM, F1, Recall@k."
        ),
    ] = 1e-6,
    data_path: Annotated[
        str | None, typer.Option("--data-path", help="Where the trial's data file is now.")
    ] = None,
    storage: _StorageOption = None,
    fmt: _FormatOption = "table",
    debug: _DebugOption = False,
) -> None:
    """Re-run a trial from its stored record; exit 1 when metrics differ beyond the tolerance."""
    from search._views import as_json, reproduction_record
    from search.report import best_of
    from search.reproduce import reproduce_trial
    from trainers.errors import ConfigError

    _check_format(fmt, ("table", "json"))
    if (trial is None) == (not best_trial):
        raise ConfigError("say which trial: --trial <stage>/<number> or --best (one of them)")
    report = _load_report(study, storage)
    row = best_of(report) if best_trial else report.trial(trial or "")
    _quiet_libraries()
    if fmt == "table":
        _console.print(f"reproducing {report.name} {row.id} ({row.method}) from its record ...")
    reproduction = reproduce_trial(
        row,
        cache_dir=_cache_dir(),
        out_dir=out,
        merged=merged,
        tolerance=tolerance,
        data_path=data_path,
    )
    if fmt == "json":
        print(as_json(reproduction_record(reproduction)))
    else:
        _print_reproduction(reproduction)
    if not reproduction.matches:
        raise typer.Exit(1)


@app.command()
@_one_line_errors
def dashboard(
    storage: _StorageOption = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Find the database as studies/<study>.db.")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    debug: _DebugOption = False,
) -> None:
    """optuna-dashboard on the study database, on 127.0.0.1 unless --host says otherwise."""
    from search.store import mask_url
    from trainers.errors import ConfigError

    try:
        from optuna_dashboard import run_server
    except ImportError as e:
        raise ConfigError(
            "optuna-dashboard is not installed; pip install 'ragsweep[dashboard]'"
        ) from e
    url = _query_url(storage, study)
    opened = _open_existing(url)
    _console.print(
        f"optuna-dashboard for {mask_url(url)} on http://{host}:{port} (Ctrl-C stops it)",
        highlight=False,
    )
    run_server(opened, host=host, port=port)


def _query_url(explicit: str | None, study: str | None) -> str:
    """--storage, else RAGSWEEP_STORAGE, else studies/<study>.db where `make demo` writes it."""
    from trainers.errors import ConfigError

    url = explicit or os.environ.get("RAGSWEEP_STORAGE")
    if url:
        return url
    candidate = Path("studies") / f"{(study or '').split('/')[0]}.db"
    if study and candidate.is_file():
        return f"sqlite:///{candidate.resolve()}"
    raise ConfigError(
        "which database? pass --storage URL (e.g. sqlite:///studies/demo.db) or set RAGSWEEP_STORAGE"
    )


def _open_existing(url: str):  # -> optuna.storages.RDBStorage
    """Open a storage for reading; a SQLite file that is not there is an error, never created."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from search.store import StorageError, mask_url, open_storage

    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None  # open_storage says what is wrong with it
    if parsed is not None and parsed.get_backend_name() == "sqlite":
        if not parsed.database or not Path(parsed.database).is_file():
            raise StorageError(
                f"database file '{parsed.database}' does not exist; check --storage ({mask_url(url)}) "
                "or launch a study there first"
            )
    return open_storage(url)


def _load_report(study: str, storage: str | None):  # -> search.report.StudyReport
    from search.report import load_study

    url = _query_url(storage, study)
    return load_study(_open_existing(url), study, url)


def _check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise _bad_choice("--format", fmt, allowed)


def _emit(records: list[dict], fmt: str, title: str, columns: list[str]) -> None:
    from search._views import as_csv, as_json, as_table

    _check_format(fmt, _FORMATS)
    if fmt == "json":
        print(as_json(records))
    elif fmt == "csv":
        print(as_csv(records), end="")
    else:
        _console.print(as_table(title, records, columns))


def _cell(column: str, value: object) -> str:
    from search._views import cell

    return cell(column, value) + (" " if column == "flops" else "")


def _bad_suffix(path: Path, suffixes: tuple[str, ...]) -> RagsweepError:
    from trainers.errors import ConfigError

    return ConfigError(f"'{path}' must end in {' or '.join(suffixes)}; the suffix picks the format")


def _trial_detail(report, row, title: str) -> Table:
    from search._views import cell, trial_record

    record = row.attrs.get("record") or {}
    environment = record.get("environment") or {}
    summary = trial_record(report, row)
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key in (
        "trial",
        "method",
        "state",
        "lr_embedder",
        "lr_generator",
        "em",
        "f1",
        "recall_at_k",
        "train_flops",
        "run_flops",
        "train_device_s",
        "wall_s",
    ):
        table.add_row(key, cell(key, summary[key]))
    details = {
        "seed": record.get("seed"),
        "data fingerprint": record.get("data_fingerprint"),
        "phases": ", ".join(record.get("phases", [])) or "none",
        "reused phases": ", ".join(record.get("reused_phases", [])) or "none",
        "final losses": record.get("final_losses"),
        "checkpoint": row.attrs.get("checkpoint"),
        "git commit": environment.get("git"),
        "packages": environment.get("packages"),
        "hardware": environment.get("hardware"),
        "started": row.started,
        "completed": row.completed,
    }
    for key, value in details.items():
        table.add_row(key, "-" if value is None else str(value))
    return table


def _print_reproduction(reproduction) -> None:  # search.reproduce.Reproduction
    table = Table(
        title=f"trial {reproduction.trial.id}: recorded against reproduced", title_justify="left"
    )
    for column in ("metric", "recorded", "reproduced", "|difference|"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, difference in reproduction.differences.items():
        table.add_row(
            key,
            f"{reproduction.recorded[key]:.6f}",
            f"{reproduction.reproduced[key]:.6f}",
            f"{difference:.2e}",
        )
    _console.print(table)
    if reproduction.drift:
        drift = Table(title="environment drift since the trial ran", title_justify="left")
        for column in ("field", "recorded", "now"):
            drift.add_column(column)
        for field, before, after in reproduction.drift:
            drift.add_row(field, before, after)
        _console.print(drift)
    else:
        _console.print("environment: same versions, commit and hardware as recorded")
    for name, path in reproduction.saved.items():
        _console.print(f"saved {name}: {path}", highlight=False)
    verdict = "match" if reproduction.matches else "DIFFER"
    _console.print(
        f"metrics {verdict} within the tolerance of {reproduction.tolerance:g} (absolute, on EM, F1 and Recall@k)"
    )


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
            _errors.print(
                f"[bold red]error:[/] {message}; see {command} --help",
                highlight=False,
                soft_wrap=True,
            )
        raise SystemExit(getattr(e, "exit_code", 2)) from None
    raise SystemExit(code if isinstance(code, int) else 0)
