"""The query commands: what a study database holds, read back as tables, JSON or CSV.

Their flags and environment variables are read here; ``search.cli`` adds :data:`app`'s commands to
``ragsweep``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from search.cli_common import (
    DebugOption,
    StorageOption,
    bad_choice,
    cache_dir,
    console,
    one_line_errors,
    quiet_libraries,
    storage_url,
)
from search.query.intervals import RESAMPLES, SEED
from trainers import ConfigError, RagsweepError

if TYPE_CHECKING:
    from search.query.report import StudyReport

app = typer.Typer()
_FormatOption = Annotated[
    str, typer.Option("--format", help="table, markdown (the table, for docs), json or csv.")
]
_StudyArgument = Annotated[
    str,
    typer.Argument(help="Study name (the spec's name), or one stage study such as demo/ft_gen."),
]
_MetricOption = Annotated[
    str | None,
    typer.Option("--metric", help="f1, em or recall; default: the study's objective, else f1."),
]
# The bootstrap behind every 95% interval (search.query.intervals).
_ResamplesOption = Annotated[int, typer.Option("--resamples", min=100, help="Bootstrap resamples.")]
_SeedOption = Annotated[int, typer.Option("--seed", help="Bootstrap seed.")]
_FORMATS = ("table", "markdown", "json", "csv")
# Rows of `ragsweep trials` a table shows unless told otherwise.
_TABLE_ROWS = 100


@app.command()
@one_line_errors
def studies(
    storage: StorageOption = None, fmt: _FormatOption = "table", debug: DebugOption = False
) -> None:
    """Every study in the database: methods, trials by state, best score and compute spent."""
    from search.query._views import STUDIES_COLUMNS, studies_records
    from search.query.report import summarize_studies
    from search.store import mask_url, open_database

    url = _query_url(storage, None)
    summaries = summarize_studies(open_database(url))
    _keep_to_the_end()
    records = studies_records(summaries)
    _emit(records, fmt, f"studies in {mask_url(url)}", STUDIES_COLUMNS)


@app.command()
@one_line_errors
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
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=0,
            help=f"Show the first N rows in the sort order; 0 shows all. Default: {_TABLE_ROWS} in a table, all in json, csv and markdown.",
        ),
    ] = None,
    storage: StorageOption = None,
    fmt: _FormatOption = "table",
    debug: DebugOption = False,
) -> None:
    """One row per trial: learning rates, EM, F1, Recall@k, cost, state, why it failed and
    where early stopping stopped it."""
    from search.query._views import TRIAL_COLUMNS, trial_record
    from search.query.report import select_trials

    _check_format(fmt, _FORMATS)
    report = _load_report(study, storage)
    rows = select_trials(report, method=method, state=state, sort=sort)
    if limit is None:
        limit = _TABLE_ROWS if fmt == "table" else 0
    shown = rows[:limit] if limit else rows
    records = [trial_record(report, row) for row in shown]
    _emit(records, fmt, f"study {report.name}: {len(rows)} trials", TRIAL_COLUMNS)
    if len(shown) < len(rows) and fmt == "table":
        # A person reads a screenful; thousands of table rows also take rich seconds to lay out.
        console.print(
            f"the first {len(shown)} of {len(rows)} trials; --sort f1 puts the best first, "
            "--limit 0 shows all, --format csv gives every row to a script"
        )


@app.command()
@one_line_errors
def best(
    study: _StudyArgument,
    metric: _MetricOption = None,
    method: Annotated[str | None, typer.Option("--method", help="Only this method.")] = None,
    resamples: _ResamplesOption = RESAMPLES,
    seed: _SeedOption = SEED,
    storage: StorageOption = None,
    fmt: _FormatOption = "table",
    debug: DebugOption = False,
) -> None:
    """The best completed trial on a validation metric, with the 95% intervals of its scores and
    everything recorded about it."""
    from search.query._views import as_json, interval_record, trial_detail, trial_record
    from search.query.export import export_row
    from search.query.report import best_of, objective_metric

    _check_format(fmt, ("table", "json"))
    report = _load_report(study, storage)
    metric = metric or objective_metric(report)
    row = best_of(report, metric, method)
    intervals = interval_record(row.questions, resamples=resamples, seed=seed)
    if fmt == "json":
        extra = {"run_flops": trial_record(report, row)["run_flops"], "intervals_95": intervals}
        print(as_json(export_row(report, row) | extra))
        return
    console.print(trial_detail(report, row, f"best trial of {report.name} on {metric}", intervals))


@app.command()
@one_line_errors
def pareto(
    study: _StudyArgument,
    cost: Annotated[
        str,
        typer.Option(
            "--cost", help="train_flops, train_device_s, train_wall_s, wall_s, peak_mem_mb, ..."
        ),
    ] = "train_flops",
    metric: _MetricOption = None,
    storage: StorageOption = None,
    fmt: _FormatOption = "table",
    debug: DebugOption = False,
) -> None:
    """The trials no other trial beats on both quality and cost, across methods, cheapest first."""
    from search.query._views import pareto_records
    from search.query.report import objective_metric, pareto_front

    report = _load_report(study, storage)
    metric = metric or objective_metric(report)
    points, front = pareto_front(report, metric=metric, cost=cost)
    records, columns = pareto_records(front, metric=metric, cost=cost)
    title = f"study {report.name}: {len(front)} of {len(points)} completed trials on the {metric}-{cost} front"
    _emit(records, fmt, title, columns)


@app.command()
@one_line_errors
def compare(
    study: _StudyArgument,
    resamples: _ResamplesOption = RESAMPLES,
    seed: _SeedOption = SEED,
    storage: StorageOption = None,
    fmt: _FormatOption = "table",
    debug: DebugOption = False,
) -> None:
    """The paper's table: each method's chosen run, the 95% intervals of its scores and its
    paired difference to the best, its cost and its search's cost, and advice."""
    from search.query._compare_views import (
        COMPARE_COLUMNS,
        INTERVAL_COLUMNS,
        compare_records,
        comparison_lines,
        interval_title,
    )
    from search.query.compare import compare as compare_methods

    _check_format(fmt, _FORMATS)
    report = _load_report(study, storage)
    comparison = compare_methods(report, resamples=resamples, seed=seed)
    records = compare_records(comparison)
    if fmt in ("json", "csv"):
        _emit(records, fmt, "", ())
        return
    title = f"study {report.name}: methods at their best validation run"
    _emit(records, fmt, title, COMPARE_COLUMNS)
    if any(record["questions"] for record in records):  # runs with per-question results
        if fmt == "markdown":
            print(f"\n{interval_title(comparison)}\n")
        _emit(records, fmt, interval_title(comparison), INTERVAL_COLUMNS)
    for line in comparison_lines(comparison):
        console.print(line, highlight=False)


@app.command()
@one_line_errors
def export(
    study: _StudyArgument,
    out: Annotated[Path, typer.Option("-o", "--out", help="A .json or .csv file.")],
    per_question: Annotated[
        bool, typer.Option("--per-question", help="A row per trial and validation question.")
    ] = False,
    storage: StorageOption = None,
    debug: DebugOption = False,
) -> None:
    """Every trial with every recorded attribute, or with --per-question each trial's answer to
    each validation question, to JSON or CSV (by the file's suffix)."""
    from search.query._views import as_csv, as_json
    from search.query.export import export_rows, question_rows

    if out.suffix.lower() not in (".json", ".csv"):
        raise _bad_suffix(out, (".json", ".csv"))
    report = _load_report(study, storage)
    rows = question_rows(report) if per_question else export_rows(report)
    if per_question and not rows:
        raise ConfigError(
            f"no trial of study '{report.name}' has per-question results (stored with every "
            "completed trial since ragsweep kept them, not with older ones); launch the spec "
            "again under a new name (launch --name NEW) to record them"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Retrieved ids, one list per cell: joined with ";" in a CSV, readable without a JSON parser.
    out.write_text(as_json(rows) if out.suffix.lower() == ".json" else as_csv(rows, joined=";"))
    what = "answers (a row per trial and question)" if per_question else "trials"
    console.print(escape(f"wrote {len(rows)} {what} of {report.name} to {out}"))


@app.command()
@one_line_errors
def plot(
    study: _StudyArgument,
    out: Annotated[Path, typer.Option("-o", "--out", help="A .png, .svg or .pdf file.")],
    metric: _MetricOption = None,
    cost: Annotated[
        str, typer.Option("--cost", help="train_flops, train_device_s, ...")
    ] = "train_flops",
    resamples: _ResamplesOption = RESAMPLES,
    seed: _SeedOption = SEED,
    storage: StorageOption = None,
    debug: DebugOption = False,
) -> None:
    """Quality against cost for every trial (front marked, each method's chosen run with its 95%
    interval as an error bar), and heat maps of coupled LR grids."""
    from search.query.plots import plot_study
    from search.query.report import objective_metric

    report = _load_report(study, storage)
    metric = metric or objective_metric(report)
    written = plot_study(report, out, metric=metric, cost=cost, resamples=resamples, seed=seed)
    console.print(escape(f"wrote {written}"))


@app.command()
@one_line_errors
def reproduce(
    study: _StudyArgument,
    trial: Annotated[
        str | None, typer.Option("--trial", help="<stage>/<number> as `ragsweep trials` shows.")
    ] = None,
    best_trial: Annotated[
        bool, typer.Option("--best", help="The best trial on the study's objective, else F1.")
    ] = False,
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
    storage: StorageOption = None,
    fmt: _FormatOption = "table",
    debug: DebugOption = False,
) -> None:
    """Re-run a trial from its stored record; exit 1 when metrics differ beyond the tolerance."""
    from search.query._views import as_json, reproduction_record, reproduction_report
    from search.query.report import best_of
    from search.query.reproduce import reproduce_trial, stored_config

    _check_format(fmt, ("table", "json"))
    if (trial is None) == (not best_trial):
        raise ConfigError("say which trial: --trial <stage>/<number> or --best (one of them)")
    report = _load_report(study, storage)
    row = best_of(report) if best_trial else report.trial(trial or "")
    config = stored_config(row, data_path=data_path)  # a record that cannot re-run: before loading
    quiet_libraries(debug)
    if fmt == "table":
        console.print(
            escape(f"reproducing {report.name} {row.id} ({row.method}) from its record ...")
        )
    reproduction = reproduce_trial(
        row, config, cache_dir=cache_dir(), out_dir=out, merged=merged, tolerance=tolerance
    )
    if fmt == "json":
        print(as_json(reproduction_record(reproduction)))
    else:
        for renderable in reproduction_report(reproduction):
            console.print(renderable, highlight=False)
    if not reproduction.matches:
        raise typer.Exit(1)


@app.command()
@one_line_errors
def dashboard(
    storage: StorageOption = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Find the database as studies/<study>.db.")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    debug: DebugOption = False,
) -> None:
    """optuna-dashboard on the study database, on 127.0.0.1 unless --host says otherwise."""
    from search.query.dashboard import serve

    serve(_query_url(storage, study), host=host, port=port)


def _query_url(explicit: str | None, study: str | None) -> str:
    """The launch's rule (:func:`search.cli_common.storage_url`) without a spec: the default
    studies/<study>.db, where `make demo` writes it, only when that file exists."""

    default_file = Path("studies") / f"{(study or '').split('/')[0]}.db"
    if explicit or os.environ.get("RAGSWEEP_STORAGE") or (study and default_file.is_file()):
        return storage_url(explicit, None, default_file)
    raise ConfigError(
        "which database? pass --storage URL (e.g. sqlite:///studies/demo.db) or set RAGSWEEP_STORAGE"
    )


def _load_report(study: str, storage: str | None) -> StudyReport:
    from search.query.report import load_study
    from search.store import open_database

    report = load_study(open_database(_query_url(storage, study)), study)
    _keep_to_the_end()
    return report


def _keep_to_the_end() -> None:
    """What was read stays until this short process ends: move it out of the cycle collector's
    sight, so that neither its passes nor the one at exit scan it again (0.1 s at exit for 5,000
    trials)."""
    gc.freeze()


def _check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise bad_choice("--format", fmt, allowed)


def _emit(records: list[dict[str, Any]], fmt: str, title: str, columns: Sequence[str]) -> None:
    from search.query._views import as_csv, as_json, as_markdown, as_table, shown_columns

    _check_format(fmt, _FORMATS)
    columns = shown_columns(columns, records)  # early stopping's, where some trial was stopped
    if fmt == "json":
        print(as_json(records))
    elif fmt == "csv":
        print(as_csv(records), end="")
    elif fmt == "markdown":
        print(as_markdown(records, columns))
    else:
        console.print(as_table(title, records, columns))


def _bad_suffix(path: Path, suffixes: tuple[str, ...]) -> RagsweepError:

    return ConfigError(f"'{path}' must end in {' or '.join(suffixes)}; the suffix picks the format")
