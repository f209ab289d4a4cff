"""The paper's comparison of methods for one study: each method's chosen run, how sure its
scores are, what it cost, what its search cost with shared stages, and the advice that follows
(``ragsweep compare``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from search.query._compare_notes import distinguishable, held_out_notes, interval_notes
from search.query.intervals import (
    RESAMPLES,
    SEED,
    Interval,
    PairedDifference,
    metric_intervals,
    paired_difference,
    question_scores,
    questions_needed,
)
from search.query.report import StudyReport, objective_metric, quality_key, run_cost
from search.store import TrialRecord, best_trial
from trainers import QuestionResult

__all__ = ["Comparison", "EarlyStopped", "MethodResult", "compare"]

# What a trial spent on training and evaluation: what early stopping cuts short.
_WORK = ("train_device_s", "eval.device_s")


@dataclass(frozen=True)
class MethodResult:
    """One row of the paper's table: a method's chosen run and what its search cost."""

    method: str
    chosen: TrialRecord | None  # None when no trial of the method completed
    run_flops: float | None  # the chosen run, reused phases included
    run_device_s: float | None
    search_stages: Mapping[str, int]  # stage -> trials, every stage the result depends on
    search_flops: float
    search_device_s: float
    # The chosen run's 95% intervals over its validation questions, by metric (em, f1,
    # recall_at_k; Recall@k absent without context labels); empty without per-question results.
    intervals: Mapping[str, Interval] = field(default_factory=dict)
    # Its paired difference to the best method's run on the comparison's metric; None for the
    # best itself, or without both runs' per-question results on the same questions.
    difference: PairedDifference | None = None

    @property
    def questions(self) -> int | None:
        """The validation questions its intervals rest on (None without per-question results)."""
        return max((interval.questions for interval in self.intervals.values()), default=None)

    @property
    def questions_needed(self) -> int | None:
        """Validation questions a paired comparison would need to tell it from the best at the
        observed difference (see :func:`search.query.intervals.questions_needed`)."""
        return None if self.difference is None else questions_needed(self.difference)


@dataclass(frozen=True)
class EarlyStopped:
    """The trials of one stage that early stopping stopped, what they cost and what it saved.

    Had they run to the end, each would have cost what the stage's completed trials cost on
    average (training + evaluation device seconds): an estimate, as a stopped trial's rate may
    have trained faster or slower."""

    stage: str
    trials: int  # the stage's finished trials
    pruned: int
    pruned_device_s: float  # what they cost: training (rung signals in it) + evaluation
    full_device_s: float | None  # the estimate run to the end; None: none of the stage completed

    @property
    def saved_device_s(self) -> float | None:
        """Training + evaluation device seconds early stopping saved in this stage (estimate)."""
        return None if self.full_device_s is None else self.full_device_s - self.pruned_device_s


@dataclass(frozen=True)
class Comparison:
    """``ragsweep compare``: rows per method, the whole study's cost, notes and the advice."""

    rows: tuple[MethodResult, ...]
    total_trials: int
    total_flops: float
    total_device_s: float
    notes: tuple[str, ...]
    recommendation: tuple[str, ...]
    # Stages where early stopping stopped trials, in stage order; empty when none was stopped.
    early_stopped: tuple[EarlyStopped, ...] = ()
    work_device_s: float = 0.0  # training + evaluation device seconds of every trial of the study
    metric: str = "f1"  # the metric methods are ranked and paired on
    best: str | None = None  # the method whose chosen run scores highest on it
    resamples: int = RESAMPLES  # the bootstrap's resamples and seed, for every interval
    seed: int = SEED

    def saved_device_s(self, stages: Iterable[str] | None = None) -> float:
        """Device seconds early stopping saved (estimate) over ``stages`` (default: all), counting
        the stages where it can be estimated."""
        wanted = None if stages is None else set(stages)
        return sum(
            (
                stopped.saved_device_s or 0.0
                for stopped in self.early_stopped
                if wanted is None or stopped.stage in wanted
            ),
            0.0,
        )


def compare(
    report: StudyReport,
    metric: str | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Comparison:
    """The paper's table: each method's best run on validation, how sure its scores are, its
    cost and its search's cost.

    A method's search cost counts the earlier stages the plan says it built on: a study whose
    stored spec cannot be read is refused in one line rather than shown without them. Intervals
    are bootstraps over the chosen runs' validation questions (:mod:`search.query.intervals`,
    ``resamples`` and ``seed``); each method is paired with the best method's run on ``metric``.
    """
    report.needs_plan("compare", "the stages each method's search ran")
    metric_key = quality_key(metric or objective_metric(report))
    chosen = {
        method: best_trial(
            [row for row in report.trials if row.method == method and row.stage == method],
            metric_key,
        )
        for method in report.methods
    }
    scored = {method: row for method, row in chosen.items() if row is not None}
    # The same rule as best_trial: ties go to the first method in the spec's order.
    best = max(scored, key=lambda method: scored[method].metrics[metric_key], default=None)
    reference = scored[best].questions if best is not None else None
    rows = []
    for method, row in chosen.items():
        stages = _search_stages(report, method)
        questions = row.questions if row is not None else None
        rows.append(
            MethodResult(
                method=method,
                chosen=row,
                run_flops=run_cost(report, row, "train_flops") if row else None,
                run_device_s=run_cost(report, row, "train_device_s") if row else None,
                search_stages=stages,
                search_flops=report.spent(stages, "train_flops"),
                search_device_s=report.spent(stages, "train_device_s"),
                intervals=metric_intervals(questions, resamples=resamples, seed=seed),
                difference=None
                if method == best or questions is None or reference is None
                else _paired(questions, reference, metric_key, resamples=resamples, seed=seed),
            )
        )
    every_stage = {stage: report.finished(stage) for stage in report.stages}
    return Comparison(
        rows=tuple(rows),
        total_trials=sum(every_stage.values()),
        total_flops=report.spent(every_stage, "train_flops"),
        total_device_s=report.spent(every_stage, "train_device_s"),
        notes=(
            *_sharing_notes(report, rows),
            *interval_notes(rows, best),
            *held_out_notes(rows, metric_key),
        ),
        recommendation=tuple(
            _recommendation(report, rows, metric_key, best, resamples=resamples, seed=seed)
        ),
        early_stopped=tuple(_early_stopped(report)),
        work_device_s=sum(report.spent(every_stage, figure) for figure in _WORK),
        metric=metric_key,
        best=best,
        resamples=resamples,
        seed=seed,
    )


def _paired(
    questions: Sequence[QuestionResult],
    reference: Sequence[QuestionResult],
    metric: str,
    *,
    resamples: int,
    seed: int,
) -> PairedDifference | None:
    """``questions`` minus ``reference`` on ``metric``, question by question, matched by id;
    None when the two runs were not scored on the same questions."""
    by_id = {question.id: question for question in questions}
    reference_ids = {question.id for question in reference}
    if len(by_id) != len(questions) or len(reference_ids) != len(reference):
        return None  # question ids are not unique: no pairing can be trusted
    if set(by_id) != reference_ids:
        return None
    aligned = [by_id[question.id] for question in reference]
    return paired_difference(
        question_scores(aligned, metric),
        question_scores(reference, metric),
        resamples=resamples,
        seed=seed,
    )


def _early_stopped(report: StudyReport) -> Iterable[EarlyStopped]:
    """Per stage with pruned trials: their cost, and the same number of its completed trials'."""
    for stage in report.stages:
        rows = [row for row in report.trials if row.stage == stage]
        pruned = [_work(row) for row in rows if row.state == "PRUNED"]
        if not pruned:
            continue
        complete = [_work(row) for row in rows if row.state == "COMPLETE"]
        mean = sum(complete) / len(complete) if complete else None
        yield EarlyStopped(
            stage=stage,
            trials=report.finished(stage),
            pruned=len(pruned),
            pruned_device_s=sum(pruned),
            full_device_s=None if mean is None else mean * len(pruned),
        )


def _work(row: TrialRecord) -> float:
    return sum(float(row.metrics.get(figure, 0.0)) for figure in _WORK)


def _search_stages(report: StudyReport, method: str) -> dict[str, int]:
    if report.plan is not None and method in report.plan.methods:
        needed = cast("dict[str, int]", report.plan.search_cost(method)["stages"])
        return {stage: report.finished(stage) for stage in needed}
    return {method: report.finished(method)}


def _sharing_notes(report: StudyReport, rows: Sequence[MethodResult]) -> Iterable[str]:
    users: dict[str, list[str]] = {}
    for result in rows:
        for stage in result.search_stages:
            users.setdefault(stage, []).append(result.method)
    for stage, methods in users.items():
        if len(methods) > 1:
            yield (
                f"stage {stage} ({report.finished(stage)} trials) serves {', '.join(methods)}: "
                "each method's search cost includes it, the study total counts it once"
            )
    for result in rows:
        if result.chosen is not None and report.reuse_sources(result.chosen):
            phases = ", ".join(
                f"{phase} <- {source.id}"
                for phase, source in report.reuse_sources(result.chosen).items()
            )
            yield f"{result.method}'s run cost includes the phases it loaded ({phases})"


def _recommendation(
    report: StudyReport,
    rows: Sequence[MethodResult],
    metric_key: str,
    best: str | None,
    *,
    resamples: int,
    seed: int,
) -> Iterable[str]:
    """The paper's advice (docs/METHOD.md, "Search cost"), applied to this study's results, and
    whether the data can tell the leading methods apart."""
    by_method = {r.method: r for r in rows}
    chosen = {r.method: r.chosen for r in rows if r.chosen is not None}
    run_s = {r.method: r.run_device_s for r in rows}
    if not chosen or best is None:
        return
    score = {method: row.metrics[metric_key] for method, row in chosen.items()}
    interval = by_method[best].intervals.get(metric_key)
    sureness = (
        f"95% interval {interval.low:.3f} to {interval.high:.3f} over {interval.questions} "
        "questions; "
        if interval is not None
        else ""
    )
    yield (
        f"best on validation {metric_key}: {best} ({score[best]:.3f}, {sureness}lr_embedder "
        f"{_rate(chosen[best].lr_embedder)}, lr_generator {_rate(chosen[best].lr_generator)})"
    )
    yield from distinguishable(rows, metric_key, best, resamples=resamples, seed=seed)
    labels = any(row.has_context_labels for row in report.trials)
    if labels:
        pick = "independent"
        advice = (
            "the data has context labels (gold passages), so the paper recommends independent: "
            "each model searched alone (n + m runs), no joint training"
        )
    else:
        pick = "two_phase"
        advice = (
            "the data has no context labels, so the paper recommends two_phase with separate "
            "learning-rate grids (n + m runs)"
        )
    if pick == best:
        advice += f"; here it is the best method ({score[pick]:.3f})"
    elif pick in score:
        advice += (
            f"; here it reached {score[pick]:.3f} ({score[pick] - score[best]:+.3f} from the best"
        )
        difference = by_method[pick].difference
        if difference is not None and difference.sd == 0.0 and difference.interval.mean == 0.0:
            advice += f", the same {metric_key} on every question"
        elif difference is not None:
            within = "within" if not difference.distinguishable else "beyond"
            advice += (
                f", {within} noise: paired 95% interval {difference.interval.low:+.3f} to "
                f"{difference.interval.high:+.3f}"
            )
        advice += ")"
        if run_s.get(pick) is not None and run_s.get(best):
            advice += f" at {run_s[pick] / run_s[best]:.2f}x the best run's training time"  # type: ignore[operator]
    yield advice
    known = chosen.get("two_phase") or chosen.get("independent")
    if known is not None:
        yield (
            f"with the learning rates now known (lr_embedder {_rate(known.lr_embedder)}, "
            f"lr_generator {_rate(known.lr_generator)}), the paper's advice for more data of this "
            "kind is one joint run (rag_token) instead of an n x m grid"
        )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"
