"""How ``ragsweep compare`` prints: one record per method (its chosen run, cost, search cost,
intervals and paired difference to the best), shown as two tables (results, then how sure they
are), and the lines that follow them (the study's total, notes, early stopping, advice).

The records are the JSON and CSV output too (see :mod:`search.query._views`).
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from search.query._views import cell, header
from search.query.compare import Comparison, MethodResult
from search.query.intervals import Interval
from search.store import QUALITY_METRICS

__all__ = [
    "COMPARE_COLUMNS",
    "INTERVAL_COLUMNS",
    "compare_records",
    "comparison_lines",
    "early_stopping_lines",
    "interval_title",
]

COMPARE_COLUMNS = (
    "method",
    "lr_embedder",
    "lr_generator",
    *QUALITY_METRICS,
    "run_flops",
    "run_device_s",
    "search_stages",
    "search_device_s",
)
# compare's second table: how sure each method's scores are (the same records as the first).
INTERVAL_COLUMNS = (
    "method",
    "trial",
    "questions",
    *(f"{metric}_95" for metric in QUALITY_METRICS),
    "vs_best",
    "vs_best_95",
    "verdict",
    "questions_needed",
)


def compare_records(comparison: Comparison) -> list[dict[str, Any]]:
    records = []
    for result in comparison.rows:
        chosen = result.chosen
        # With early stopping: the trials it stopped in the method's search, and what it saved.
        stopped = [s for s in comparison.early_stopped if s.stage in result.search_stages]
        early_stopping = (
            {
                "pruned_trials": sum(s.pruned for s in stopped),
                "saved_device_s": comparison.saved_device_s(result.search_stages),
            }
            if comparison.early_stopped
            else {}
        )
        records.append(
            {
                "method": result.method,
                "trial": chosen.id if chosen else None,
                "lr_embedder": chosen.lr_embedder if chosen else None,
                "lr_generator": chosen.lr_generator if chosen else None,
                **{
                    metric: chosen.metrics.get(metric) if chosen else None
                    for metric in QUALITY_METRICS
                },
                "run_flops": result.run_flops,
                "run_device_s": result.run_device_s,
                "search_trials": sum(result.search_stages.values()),
                "search_stages": dict(result.search_stages),
                "search_flops": result.search_flops,
                "search_device_s": result.search_device_s,
                **early_stopping,
                # How sure the scores are: bootstraps over the chosen run's questions.
                "questions": result.questions,
                **{
                    f"{metric}_95": _bounds(result.intervals.get(metric))
                    for metric in QUALITY_METRICS
                },
                "best_method": comparison.best,
                "vs_best_metric": comparison.metric,
                "vs_best": result.difference.interval.mean if result.difference else None,
                "vs_best_95": _bounds(result.difference.interval if result.difference else None),
                "verdict": _verdict(result, comparison.best),
                "questions_needed": result.questions_needed,
                "resamples": comparison.resamples,
                "seed": comparison.seed,
            }
        )
    return records


def interval_title(comparison: Comparison) -> str:
    """What compare's second table shows, with the bootstrap's resamples and seed."""
    return (
        f"95% intervals over each chosen run's validation questions (percentile bootstrap, "
        f"{comparison.resamples} resamples, seed {comparison.seed}); vs best: the paired "
        f"{header(comparison.metric)} difference to {comparison.best}"
    )


def comparison_lines(comparison: Comparison) -> list[str]:
    """What follows the tables, as rich markup: the study's total, notes, early stopping, advice."""
    lines = [
        f"whole study: {comparison.total_trials} trials, {cell('flops', comparison.total_flops)} "
        f"FLOPs, {_time(comparison.total_device_s)} of training (shared stages counted once)"
    ]
    lines += [escape(f"note: {note}") for note in comparison.notes]
    lines += [escape(line) for line in early_stopping_lines(comparison)]
    lines += [f"[bold]advice:[/] {escape(line)}" for line in comparison.recommendation]
    return lines


def early_stopping_lines(comparison: Comparison) -> list[str]:
    """What early stopping saved: the whole study, then each stage where it stopped trials."""
    stopped = comparison.early_stopped
    if not stopped:
        return []
    pruned = sum(s.pruned for s in stopped)
    spent = sum(s.pruned_device_s for s in stopped)
    saved = comparison.saved_device_s()
    unknown = [s.stage for s in stopped if s.full_device_s is None]
    would_take = comparison.work_device_s + saved
    line = f"early stopping stopped {pruned} of {comparison.total_trials} trials at a rung"
    if would_take > 0:
        line += (
            f"; they cost {_time(spent)} of training + evaluation: saved about "
            f"{_time(saved)} ({saved / would_take:.0%} of the {_time(would_take)} the "
            "study's training + evaluation would have taken with every trial run to the end)"
        )
    if unknown:
        line += f"; not counted: {', '.join(unknown)} (no trial there ran to the end to compare)"
    lines = [line]
    for s in stopped:
        estimate = (
            "unknown (no trial of the stage ran to the end)"
            if s.full_device_s is None or s.saved_device_s is None
            else f"about {_time(s.saved_device_s)} (run to the end they would have cost "
            f"{_time(s.full_device_s)}, at the mean of the stage's completed trials)"
        )
        lines.append(
            f"stage {s.stage}: {s.pruned} of {s.trials} trials stopped early, costing "
            f"{_time(s.pruned_device_s)}; saved {estimate}"
        )
    return lines


def _verdict(result: MethodResult, best: str | None) -> str | None:
    if result.method == best and result.intervals:
        return "best (reference)"
    if result.difference is None:
        return None
    if result.difference.distinguishable:
        return "distinguishable from the best"
    if result.difference.interval.mean == 0.0:
        return "not distinguishable from the best (no difference observed)"
    return "not distinguishable from the best"


def _bounds(interval: Interval | None) -> list[float] | None:
    return None if interval is None else interval.bounds


def _time(seconds: float) -> str:
    return cell("device_s", seconds)
