"""What a study database holds, read back as answers: trials, the best run, the quality-cost front
and the paper's comparison of methods.

Read-only. A *study* here is what one spec launched (its stage studies share the ``ragsweep.group``
attribute); a stage study's own name (``demo/ft_gen``) selects that stage alone, and a study that
ragsweep did not write is read as one stage. Trials are named ``<stage>/<number>``.

Whatever the database holds is read as far as it makes sense (:func:`search.store.record_of` for
trials); a stored spec that cannot be read leaves the study without its plan, which only
``compare`` needs (see :attr:`StudyReport.spec_problem`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydantic import ValidationError

from search.plan import Plan, make_plan
from search.spec import StudySpec
from search.store import (
    COST_METRICS,
    METRIC_NAMES,
    QUALITY_METRICS,
    StoredStudy,
    StudyDatabase,
    TrialRecord,
    best_trial,
    mask_url,
)
from trainers import ConfigError

__all__ = [
    "StudyReport",
    "StudySummary",
    "best_of",
    "load_study",
    "objective_metric",
    "pareto_front",
    "quality_key",
    "run_cost",
    "select_trials",
    "summarize_studies",
]

_SORT_KEYS = (
    "trial",
    "method",
    "state",
    "lr_embedder",
    "lr_generator",
    *METRIC_NAMES.values(),
    *COST_METRICS,
)

# Trial states that came to an end: a pruned trial was stopped on purpose and is not run again.
_FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class StudyReport:
    """A study's trials in stage order, with the spec and plan it was launched with when stored."""

    name: str
    stages: tuple[str, ...]  # the plan's order; without a plan, by name
    trials: tuple[TrialRecord, ...]
    spec: StudySpec | None
    plan: Plan | None
    # Why a stored spec gave no plan: not JSON, not an object, not a spec this version reads.
    # The trials read without it; what needs the plan refuses the study (needs_plan).
    spec_problem: str | None = None

    def needs_plan(self, command: str, use: str) -> None:
        """Refuse, in one line, a study whose stored spec cannot be read: ``command`` needs it
        for ``use``."""
        if self.spec_problem is not None:
            raise ConfigError(
                f"{self.spec_problem}; {command} needs it for {use}: run {command} with the "
                "ragsweep version that launched the study (trials, best, pareto, export and "
                "plot read the study without it)"
            )

    @property
    def methods(self) -> tuple[str, ...]:
        """The spec's methods in its order; without a stored spec, those that have trials."""
        if self.plan is not None:
            return self.plan.methods
        return tuple(dict.fromkeys(row.method for row in self.trials))

    def reuse_sources(self, row: TrialRecord) -> dict[str, TrialRecord]:
        """Phase -> the trial whose saved checkpoint ``row`` loaded for that phase."""
        sources = {}
        for phase, folder in row.reuse.items():
            source = self._by_checkpoint.get(str(Path(folder).parent))
            if source is not None:
                sources[phase] = source
        return sources

    @cached_property
    def _by_checkpoint(self) -> dict[str, TrialRecord]:
        # Built once: every reusing trial's cost looks its sources up here.
        return {str(Path(row.checkpoint)): row for row in self.trials if row.checkpoint}

    def finished(self, stage: str) -> int:
        """Trials of ``stage`` that came to an end: complete, stopped early (pruned) or failed."""
        return sum(1 for row in self.trials if row.stage == stage and row.state in _FINISHED)

    def spent(self, stages: Iterable[str], cost: str) -> float:
        """A cost figure summed over every trial of ``stages``, each trial's own part only: a
        reused phase was paid for once, in the stage that trained it."""
        wanted = set(stages)
        return sum(float(row.metrics.get(cost, 0.0)) for row in self.trials if row.stage in wanted)

    def trial(self, ref: str) -> TrialRecord:
        """The trial named ``<stage>/<number>``, or ``<number>`` when only one stage has it."""
        stage, _, number = ref.rpartition("/")
        if not number.isdigit():
            raise ConfigError(
                f"trial '{ref}' is not a trial name; use <stage>/<number> as `ragsweep trials {self.name}` lists them"
            )
        matches = [
            row
            for row in self.trials
            if row.number == int(number) and (not stage or row.stage == stage)
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ConfigError(
                f"study '{self.name}' has no trial '{ref}'; `ragsweep trials {self.name}` lists its trials"
            )
        names = ", ".join(row.id for row in matches)
        raise ConfigError(f"trial '{ref}' is ambiguous in study '{self.name}': use one of {names}")


@dataclass(frozen=True)
class StudySummary:
    """One line of ``ragsweep studies``."""

    name: str
    methods: tuple[str, ...]
    states: Mapping[str, int]
    objective: str  # the quality metric it ranks by (objective_metric)
    best: float | None  # the best completed trial's value of it
    train_flops: float
    train_device_s: float


def summarize_studies(database: StudyDatabase) -> list[StudySummary]:
    """Every study in the database, launches grouped: methods, trials by state, the best value of
    the metric it ranks by, compute."""
    groups: dict[str, list[StoredStudy]] = {}
    for study in database.studies():
        groups.setdefault(study.group, []).append(study)
    return [_summarize(name, _report(database, name, studies)) for name, studies in groups.items()]


def load_study(database: StudyDatabase, name: str) -> StudyReport:
    """The study ``name`` (a launch, or one stage study by its full name) with all its trials."""
    studies = database.studies()
    chosen = [s for s in studies if s.group == name] or [s for s in studies if s.name == name]
    if not chosen:
        known = sorted({s.group for s in studies})
        listing = f"; it holds: {', '.join(known)}" if known else "; it holds no study yet"
        raise ConfigError(
            f"no study '{name}' in {mask_url(database.url)}{listing} (see `ragsweep studies`)"
        )
    return _report(database, name, chosen)


def select_trials(
    report: StudyReport,
    *,
    method: str | None = None,
    state: str | None = None,
    sort: str | None = None,
) -> list[TrialRecord]:
    """Trials filtered by method and state, sorted by ``sort`` (quality best first, cost lowest)."""
    if method is not None and method not in {row.method for row in report.trials}:
        _unknown("method", method, sorted({row.method for row in report.trials}))
    states = ("COMPLETE", "FAIL", "RUNNING", "WAITING", "PRUNED")
    if state is not None and state.upper() not in states:
        _unknown("state", state, [s.lower() for s in states])
    if sort is not None and sort not in _SORT_KEYS:
        _unknown("sort key", sort, list(_SORT_KEYS))
    rows = [
        row
        for row in report.trials
        if (method is None or row.method == method)
        and (state is None or row.state == state.upper())
    ]
    if sort is None or sort == "trial":
        return rows
    if sort in ("method", "state"):
        return sorted(rows, key=lambda row: getattr(row, sort))
    descending = sort in METRIC_NAMES.values()

    def key(row: TrialRecord) -> tuple[bool, float]:
        value: float | None = (
            getattr(row, sort) if sort.startswith("lr_") else row.metrics.get(sort)
        )
        if value is None:
            return True, 0.0
        return False, -value if descending else value

    return sorted(rows, key=key)


def objective_metric(report: StudyReport) -> str:
    """The quality metric the study ranks by: its first objective when that is one (a study that
    scores retrieval alone ranks by recall_at_k), else f1."""
    metric = report.spec.objectives[0].metric if report.spec else "f1"
    return metric if metric in QUALITY_METRICS else "f1"


def best_of(
    report: StudyReport, metric: str | None = None, method: str | None = None
) -> TrialRecord:
    """The completed trial with the highest ``metric`` (f1, em or recall; None: the study's
    :func:`objective_metric`); ties go to the earliest."""
    key = quality_key(metric or objective_metric(report))
    best = best_trial(select_trials(report, method=method), key)
    if best is None:
        which = f" of method '{method}'" if method else ""
        raise ConfigError(
            f"study '{report.name}' has no completed trial{which} with {key}; "
            f"see `ragsweep trials {report.name}` for what ran and why trials failed"
        )
    return best


def pareto_front(
    report: StudyReport, *, metric: str | None = None, cost: str = "train_flops"
) -> tuple[list[tuple[TrialRecord, float, float]], list[tuple[TrialRecord, float, float]]]:
    """(every completed trial, the front) as (trial, quality, cost), front sorted by cost;
    ``metric`` None is the study's :func:`objective_metric`.

    A trial is on the front when no other trial is at least as good on quality and at least as
    cheap, and strictly better on one. Cost is :func:`run_cost`, reused phases included.
    """
    metric_key = quality_key(metric or objective_metric(report))
    _check_cost(cost)
    points = []
    for row in select_trials(report, state="complete"):
        value, price = row.metrics.get(metric_key), run_cost(report, row, cost)
        if value is not None and price is not None:
            points.append((row, float(value), price))
    front = [
        point
        for point in points
        if not any(
            other[1] >= point[1]
            and other[2] <= point[2]
            and (other[1] > point[1] or other[2] < point[2])
            for other in points
        )
    ]
    return points, sorted(front, key=lambda point: (point[2], -point[1]))


def run_cost(report: StudyReport, row: TrialRecord, cost: str = "train_flops") -> float | None:
    """What producing this trial's models cost: its own figure plus the phases it loaded.

    A trial that reused an earlier stage's checkpoint (two_phase's phase 1, independent, joint
    methods with a reused pair) trained only part of its pipeline; the reused phases' cost is read
    from the trial that saved the checkpoint, so methods compare as if each ran alone.
    """
    _check_cost(cost)
    own = row.metrics.get(cost)
    if own is None:
        return None
    total = float(own)
    figure = cost.removeprefix("train_")
    for phase, source in report.reuse_sources(row).items():
        borrowed = source.metrics.get(f"{phase}.{figure}")
        if borrowed is None:
            return None
        total = max(total, borrowed) if cost == "peak_mem_mb" else total + borrowed
    return total


# --- loading ---------------------------------------------------------------------------------------


def _report(database: StudyDatabase, name: str, studies: Sequence[StoredStudy]) -> StudyReport:
    spec, plan, problem = _stored_plan(name, studies)
    order = [stage.name for stage in plan.stages] if plan else []
    by_stage = {study.stage: study for study in studies}
    stages = tuple(
        sorted(by_stage, key=lambda st: (order.index(st) if st in order else len(order), st))
    )
    trials = database.trials([by_stage[stage] for stage in stages])
    return StudyReport(
        name=name,
        stages=stages,
        trials=tuple(trials),
        spec=spec,
        plan=plan,
        spec_problem=problem,
    )


def _stored_plan(
    name: str, studies: Sequence[StoredStudy]
) -> tuple[StudySpec | None, Plan | None, str | None]:
    """(spec, plan, why not) from the first of ``studies`` whose stored spec reads; no spec stored
    (a study ragsweep did not write) is no plan and no problem."""
    problem = None
    for study in studies:
        if study.spec is None:
            problem = problem or _spec_problem(name, study.spec_problem)
            continue
        try:
            spec = StudySpec.model_validate(study.spec)
            return spec, make_plan(spec, forecast=False), None  # the stages only: no torch
        except ValidationError as e:  # written by another ragsweep version
            error = e.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "spec"
            problem = problem or _spec_problem(name, f"does not validate ({where}: {error['msg']})")
        except ConfigError as e:
            problem = problem or _spec_problem(name, f"gives no plan ({e})")
    return None, None, problem


def _spec_problem(name: str, why: str | None) -> str | None:
    return None if why is None else f"the spec stored with study '{name}' {why}"


# --- small helpers ---------------------------------------------------------------------------------


def _summarize(name: str, report: StudyReport) -> StudySummary:
    metric = objective_metric(report)
    completed = [row for row in report.trials if row.state == "COMPLETE" and metric in row.metrics]
    return StudySummary(
        name=name,
        methods=report.methods,
        states=Counter(row.state for row in report.trials),
        objective=metric,
        best=max((row.metrics[metric] for row in completed), default=None),
        train_flops=report.spent(report.stages, "train_flops"),
        train_device_s=report.spent(report.stages, "train_device_s"),
    )


def quality_key(metric: str) -> str:
    """The metric key trials report for a --metric name (f1, em, recall)."""
    if metric not in METRIC_NAMES:
        _unknown("metric", metric, list(METRIC_NAMES))
    return METRIC_NAMES[metric]


def _check_cost(cost: str) -> None:
    if cost not in COST_METRICS:
        _unknown("cost", cost, list(COST_METRICS))


def _unknown(what: str, value: str, choices: Sequence[str]) -> None:
    raise ConfigError(f"{what} '{value}' is not one of: {', '.join(choices)}")
