"""How the query commands print: rich tables for people, JSON and CSV for programs.

Every command builds plain records (lists of dicts) first; the table, JSON and CSV are three
renderings of the same records, so the formats never disagree. Text from the database (study,
stage and method names, failure reasons) is escaped in what rich prints: ``[/]`` in a name is
shown, not read as markup.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from search.query.intervals import metric_intervals
from search.query.report import StudyReport, StudySummary, run_cost
from search.query.reproduce import Reproduction
from search.store import QUALITY_METRICS, TrialRecord, rung_text
from trainers import QuestionResult

__all__ = [
    "STUDIES_COLUMNS",
    "TRIAL_COLUMNS",
    "as_csv",
    "as_json",
    "as_markdown",
    "as_table",
    "cell",
    "header",
    "interval_record",
    "pareto_records",
    "reproduction_record",
    "reproduction_report",
    "shown_columns",
    "studies_records",
    "trial_detail",
    "trial_record",
]

# The columns each table shows (JSON and CSV carry every key of the records).
STUDIES_COLUMNS = (
    "study",
    "methods",
    "complete",
    "failed",
    "running",
    "objective",
    "best",
    "train_flops",
    "train_device_s",
)
TRIAL_COLUMNS = (
    "trial",
    "method",
    "state",
    "lr_embedder",
    "lr_generator",
    *QUALITY_METRICS,
    "train_flops",
    "train_device_s",
    "fail_reason",
)
# Columns a table shows, after the one named, only when some record has a value for them: what
# early stopping adds, absent from studies that ran without it.
_OPTIONAL_COLUMNS = {
    "pruned": "failed",
    "pruned_at": "state",
    "pruned_trials": "search_stages",
    "saved_device_s": "search_device_s",
}


def studies_records(summaries: Sequence[StudySummary]) -> list[dict[str, Any]]:
    return [
        {
            "study": s.name,
            "methods": ",".join(s.methods),
            "complete": s.states.get("COMPLETE", 0),
            "failed": s.states.get("FAIL", 0),
            "pruned": s.states.get("PRUNED", 0),
            "running": s.states.get("RUNNING", 0) + s.states.get("WAITING", 0),
            "objective": s.objective,
            "best": s.best,
            "train_flops": s.train_flops,
            "train_device_s": s.train_device_s,
        }
        for s in summaries
    ]


def trial_record(report: StudyReport, row: TrialRecord) -> dict[str, Any]:
    """The columns of ``ragsweep trials`` for one trial."""
    return {
        "trial": row.id,
        "method": row.method,
        "state": row.state.lower(),
        "lr_embedder": row.lr_embedder,
        "lr_generator": row.lr_generator,
        **{metric: row.metrics.get(metric) for metric in QUALITY_METRICS},
        "train_flops": row.metrics.get("train_flops"),
        "train_device_s": row.metrics.get("train_device_s"),
        "run_flops": run_cost(report, row, "train_flops"),
        "wall_s": row.metrics.get("wall_s"),
        "fail_reason": row.fail_reason,
        "pruned_at": row.pruned_at,  # where early stopping stopped it
    }


def interval_record(
    questions: Sequence[QuestionResult] | None, *, resamples: int, seed: int
) -> dict[str, Any] | None:
    """A trial's 95% interval of each metric over its ``questions`` (its per-question results),
    with what they rest on; None without them."""
    intervals = metric_intervals(questions, resamples=resamples, seed=seed)
    if not intervals:
        return None
    return {
        **{metric: interval.bounds for metric, interval in intervals.items()},
        "questions": max(interval.questions for interval in intervals.values()),
        "resamples": resamples,
        "seed": seed,
    }


def pareto_records(
    front: Sequence[tuple[TrialRecord, float, float]], *, metric: str, cost: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """``ragsweep pareto``'s records and columns for the front :func:`pareto_front` gives."""
    # The cost of the run, reused phases included (see run_cost): "run_flops", "run_device_s", ...
    run_key = "run_" + cost.removeprefix("train_")
    columns = ["trial", "method", "lr_embedder", "lr_generator", metric, run_key]
    values = (
        (row.id, row.method, row.lr_embedder, row.lr_generator, value, price)
        for row, value, price in front
    )
    return [dict(zip(columns, record, strict=True)) for record in values], columns


def shown_columns(columns: Sequence[str], records: Sequence[dict[str, Any]]) -> list[str]:
    """``columns`` and, after the column each follows, the optional ones some record fills."""
    shown = list(columns)
    for column, after in _OPTIONAL_COLUMNS.items():
        if after in shown and column not in shown and any(r.get(column) for r in records):
            shown.insert(shown.index(after) + 1, column)
    return shown


def reproduction_record(reproduction: Reproduction) -> dict[str, Any]:
    return {
        "trial": reproduction.trial.id,
        "recorded": reproduction.recorded,
        "reproduced": reproduction.reproduced,
        "differences": reproduction.differences,
        "tolerance": reproduction.tolerance,
        "matches": reproduction.matches,
        "same_answers": reproduction.same_answers,
        "drift": [
            {"field": field, "recorded": before, "now": after}
            for field, before, after in reproduction.drift
        ],
        "saved": {name: str(path) for name, path in reproduction.saved.items()},
    }


def as_json(records: Any) -> str:
    return json.dumps(records, indent=2, default=str)


def as_csv(records: Sequence[dict[str, Any]], *, joined: str | None = None) -> str:
    """Flat CSV: nested values (metrics, records) become JSON text in their cell; with
    ``joined``, a list of strings becomes its items joined by it ("d1;d7")."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: _flat(value, joined) for key, value in record.items()})
    return buffer.getvalue()


def _flat(value: Any, joined: str | None) -> Any:
    if joined is not None and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return joined.join(value)
    return json.dumps(value, default=str) if isinstance(value, dict | list) else value


def as_table(title: str, records: Sequence[dict[str, Any]], columns: Sequence[str]) -> Table:
    table = Table(title=escape(title), title_justify="left")
    for column in columns:
        numeric = any(isinstance(r.get(column), int | float) for r in records)
        table.add_column(
            header(column),
            justify="right" if numeric else "left",
            no_wrap=column in ("trial", "study", "method"),
        )
    for record in records:
        table.add_row(*(escape(cell(column, record.get(column))) for column in columns))
    return table


def as_markdown(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """The table's columns and cells as a GitHub markdown table, for docs and pull requests."""
    lines = [
        "| " + " | ".join(header(column) for column in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for record in records:
        cells = (cell(column, record.get(column)).replace("|", "\\|") for column in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(column: str, value: Any) -> str:
    """One value as a person reads it: rates in e-notation, FLOPs and seconds with units."""
    if value is None:
        return "-"
    if column.endswith("_95") and isinstance(value, list):
        sign = "+" if column == "vs_best_95" else ""
        return "[" + ", ".join(f"{bound:{sign}.3f}" for bound in value) + "]"
    if column == "vs_best":
        return f"{value:+.3f}"
    if column.startswith("lr_"):
        return f"{value:.1e}"
    if column.endswith("flops"):
        return _flops(float(value))
    if column.endswith("_s"):
        return _seconds(float(value))
    if isinstance(value, float):
        return f"{value:.3f}"
    if column == "pruned_at" and isinstance(value, dict):
        return rung_text(value)
    if isinstance(value, dict):
        return " + ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def header(column: str) -> str:
    """A column's heading in tables: ``lr E`` for lr_embedder, ``F1`` for f1, ..."""
    return _HEADERS.get(column, column)


_HEADERS = {
    "lr_embedder": "lr E",
    "lr_generator": "lr G",
    "recall_at_k": "Recall@k",
    "em": "EM",
    "f1": "F1",
    "train_flops": "train FLOPs",
    "train_device_s": "train time",
    "run_flops": "run FLOPs",
    "run_device_s": "run time",
    "search_trials": "search trials",
    "search_stages": "search stages (trials)",
    "search_flops": "search FLOPs",
    "search_device_s": "search time",
    "wall_s": "wall",
    "objective": "ranked by",
    "best": "best",
    "fail_reason": "failure",
    "pruned_at": "stopped early at",
    "pruned_trials": "stopped early",
    "saved_device_s": "saved by early stopping",
    "em_95": "EM 95%",
    "f1_95": "F1 95%",
    "recall_at_k_95": "Recall@k 95%",
    "vs_best": "vs best",
    "vs_best_95": "vs best 95%",
    "questions_needed": "questions to decide",
}


def _flops(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.3g}"


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.2f} h"
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s"


def trial_detail(
    report: StudyReport, row: TrialRecord, title: str, intervals: Mapping[str, Any] | None
) -> Table:
    """``ragsweep best``: the headline figures and their intervals (:func:`interval_record`),
    then what the record says about the run."""
    record = row.record
    environment = row.environment
    summary = trial_record(report, row)
    table = Table(title=escape(title), title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    headline = ("trial", "method", "state", "lr_embedder", "lr_generator", *QUALITY_METRICS)
    for key in headline:
        table.add_row(key, escape(cell(key, summary[key])))
    if intervals is None:
        table.add_row(
            "95% intervals",
            "none: the trial has no per-question results (stored before ragsweep kept them)",
        )
    else:
        for metric in QUALITY_METRICS:
            if intervals.get(metric) is not None:
                table.add_row(f"{metric} 95%", escape(cell(f"{metric}_95", intervals[metric])))
        table.add_row(
            "95% intervals",
            f"bootstrap over {intervals['questions']} questions: {intervals['resamples']} "
            f"resamples, seed {intervals['seed']}",
        )
    for key in ("train_flops", "run_flops", "train_device_s", "wall_s"):
        table.add_row(key, escape(cell(key, summary[key])))
    git = environment.get("git")
    details = {
        "seed": record.get("seed"),
        "data fingerprint": row.data_fingerprint,
        "phases": ", ".join(row.phases) or "none",
        "reused phases": ", ".join(row.reused_phases) or "none",
        "final losses": record.get("final_losses"),
        "checkpoint": row.checkpoint,
        "git commit": f"{git.get('commit')}{' (uncommitted changes)' if git.get('dirty') else ''}"
        if isinstance(git, dict) and git
        else None,
        "packages": environment.get("packages"),
        "hardware": environment.get("hardware"),
        "started": row.started,
        "completed": row.completed,
    }
    for key, value in details.items():
        table.add_row(key, "-" if value is None else escape(str(value)))
    return table


def reproduction_report(reproduction: Reproduction) -> list[Table | str]:
    """``ragsweep reproduce``: metrics recorded against reproduced, drift, saved models, verdict."""
    table = Table(
        title=escape(f"trial {reproduction.trial.id}: recorded against reproduced"),
        title_justify="left",
    )
    for column in ("metric", "recorded", "reproduced", "|difference|"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, difference in reproduction.differences.items():
        recorded, reproduced = reproduction.recorded[key], reproduction.reproduced[key]
        table.add_row(key, f"{recorded:.6f}", f"{reproduced:.6f}", f"{difference:.2e}")
    parts: list[Table | str] = [table]
    if reproduction.drift:
        drift = Table(title="environment drift since the trial ran", title_justify="left")
        for column in ("field", "recorded", "now"):
            drift.add_column(column)
        for field, before, after in reproduction.drift:
            drift.add_row(escape(field), escape(before), escape(after))
        parts.append(drift)
    else:
        parts.append("environment: same versions, commit and hardware as recorded")
    parts += [escape(f"saved {name}: {path}") for name, path in reproduction.saved.items()]
    if reproduction.same_answers is not None:
        same, questions = reproduction.same_answers
        parts.append(
            f"answers: {same} of {questions} validation questions with the same prediction and "
            "retrieved documents as recorded"
        )
    verdict = "match" if reproduction.matches else "DIFFER"
    parts.append(
        f"metrics {verdict} within the tolerance of {reproduction.tolerance:g} "
        "(absolute, on EM, F1 and Recall@k)"
    )
    return parts
