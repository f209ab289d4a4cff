"""What a study database holds, read back as answers: trials, the best run, the quality-cost front
and the paper's comparison of methods.

Read-only. A *study* here is what one spec launched (its stage studies share the ``ragsweep.group``
attribute); a stage study's own name (``demo/ft_gen``) selects that stage alone, and a study that
ragsweep did not write is read as one stage. Trials are named ``<stage>/<number>``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from pydantic import ValidationError

from search.plan import Plan, make_plan
from search.spec import StudySpec
from search.store import GROUP_ATTR, SPEC_ATTR, STAGE_ATTR, mask_url
from trainers.errors import ConfigError

if TYPE_CHECKING:
    from optuna.study._frozen import FrozenStudy  # what storage.get_all_studies returns

__all__ = [
    "COSTS",
    "QUALITY",
    "StudyReport",
    "StudySummary",
    "TrialRow",
    "best_of",
    "export_rows",
    "load_study",
    "quality_key",
    "pareto_front",
    "run_cost",
    "select_trials",
    "summarize_studies",
]

# --metric names users type -> the metric key trials report.
QUALITY: dict[str, str] = {
    "f1": "f1",
    "em": "em",
    "recall": "recall_at_k",
    "recall_at_k": "recall_at_k",
}
# Cost figures a trial reports; train_* count only the phases the trial trained itself.
COSTS: tuple[str, ...] = (
    "train_flops",
    "train_wall_s",
    "train_device_s",
    "train_tokens",
    "flops",
    "wall_s",
    "device_s",
    "tokens",
    "peak_mem_mb",
)
_SORT_KEYS = ("trial", "method", "state", "lr_embedder", "lr_generator", *QUALITY.values(), *COSTS)


@dataclass(frozen=True)
class TrialRow:
    """One trial as the reports see it; ``attrs`` holds every user attribute (record, checkpoint)."""

    stage: str
    number: int
    method: str
    state: str  # COMPLETE, FAIL, RUNNING, WAITING or PRUNED
    lr_embedder: float | None
    lr_generator: float | None
    metrics: Mapping[str, float]
    fail_reason: str | None
    attrs: Mapping[str, Any]
    started: datetime | None
    completed: datetime | None

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.number}"


@dataclass(frozen=True)
class StudyReport:
    """A study's trials in stage order, with the spec and plan it was launched with when stored."""

    name: str
    stages: tuple[str, ...]
    trials: tuple[TrialRow, ...]
    spec: StudySpec | None
    plan: Plan | None

    @property
    def methods(self) -> tuple[str, ...]:
        """The spec's methods in its order; without a stored spec, those that have trials."""
        if self.plan is not None:
            return self.plan.methods
        return tuple(dict.fromkeys(row.method for row in self.trials))

    def reuse_sources(self, row: TrialRow) -> dict[str, TrialRow]:
        """Phase -> the trial whose saved checkpoint ``row`` loaded for that phase."""
        reuse = ((row.attrs.get("record") or {}).get("config") or {}).get("reuse") or {}
        sources = {}
        for phase, folder in reuse.items():
            source = self._by_checkpoint.get(str(Path(folder).parent))
            if source is not None:
                sources[phase] = source
        return sources

    @cached_property
    def _by_checkpoint(self) -> dict[str, TrialRow]:
        # Built once: every reusing trial's cost looks its sources up here.
        return {
            str(Path(row.attrs["checkpoint"])): row
            for row in self.trials
            if row.attrs.get("checkpoint")
        }

    def finished(self, stage: str) -> int:
        """Trials of ``stage`` that ran to an end (complete or failed)."""
        return sum(
            1 for row in self.trials if row.stage == stage and row.state in ("COMPLETE", "FAIL")
        )

    def spent(self, stages: Iterable[str], cost: str) -> float:
        """A cost figure summed over every trial of ``stages``, each trial's own part only: a
        reused phase was paid for once, in the stage that trained it."""
        wanted = set(stages)
        return sum(float(row.metrics.get(cost, 0.0)) for row in self.trials if row.stage in wanted)

    def trial(self, ref: str) -> TrialRow:
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
    best_f1: float | None
    train_flops: float
    train_device_s: float


def summarize_studies(storage: optuna.storages.BaseStorage) -> list[StudySummary]:
    """Every study in the database, launches grouped: methods, trials by state, best F1, compute."""
    groups: dict[str, list[FrozenStudy]] = {}
    for study in storage.get_all_studies():
        groups.setdefault(_group_name(study), []).append(study)
    return [
        _summarize(name, _report(storage, name, summaries)) for name, summaries in groups.items()
    ]


def load_study(storage: optuna.storages.BaseStorage, name: str, url: str) -> StudyReport:
    """The study ``name`` (a launch, or one stage study by its full name) with all its trials."""
    # get_all_studies reads no trials (get_all_study_summaries reads them all to count them).
    summaries = storage.get_all_studies()
    chosen = [s for s in summaries if _group_name(s) == name] or [
        s for s in summaries if s.study_name == name
    ]
    if not chosen:
        known = sorted({_group_name(s) for s in summaries})
        listing = f"; it holds: {', '.join(known)}" if known else "; it holds no study yet"
        raise ConfigError(f"no study '{name}' in {mask_url(url)}{listing} (see `ragsweep studies`)")
    return _report(storage, name, chosen)


def select_trials(
    report: StudyReport,
    *,
    method: str | None = None,
    state: str | None = None,
    sort: str | None = None,
) -> list[TrialRow]:
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
    descending = sort in QUALITY.values()

    def key(row: TrialRow) -> tuple[bool, float]:
        value = getattr(row, sort) if sort.startswith("lr_") else row.metrics.get(sort)
        missing = value is None
        return missing, 0.0 if missing else (-value if descending else value)

    return sorted(rows, key=key)


def best_of(report: StudyReport, metric: str = "f1", method: str | None = None) -> TrialRow:
    """The completed trial with the highest ``metric`` (f1, em or recall); ties go to the earliest."""
    key = quality_key(metric)
    rows = [
        row for row in select_trials(report, method=method, state="complete") if key in row.metrics
    ]
    if not rows:
        which = f" of method '{method}'" if method else ""
        raise ConfigError(
            f"study '{report.name}' has no completed trial{which} with {key}; "
            f"see `ragsweep trials {report.name}` for what ran and why trials failed"
        )
    # max keeps the first of equal rows: ties go to the earliest trial, in stage order.
    return max(rows, key=lambda row: row.metrics[key])


def pareto_front(
    report: StudyReport, *, metric: str = "f1", cost: str = "train_flops"
) -> tuple[list[tuple[TrialRow, float, float]], list[tuple[TrialRow, float, float]]]:
    """(every completed trial, the front) as (trial, quality, cost), front sorted by cost.

    A trial is on the front when no other trial is at least as good on quality and at least as
    cheap, and strictly better on one. Cost is :func:`run_cost`, reused phases included.
    """
    metric_key = quality_key(metric)
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


def run_cost(report: StudyReport, row: TrialRow, cost: str = "train_flops") -> float | None:
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


def export_rows(report: StudyReport) -> list[dict[str, Any]]:
    """Every trial with every recorded attribute, nested as stored (JSON) or flat (CSV)."""
    return [
        {
            "study": report.name,
            "trial": row.id,
            "stage": row.stage,
            "number": row.number,
            "method": row.method,
            "state": row.state,
            "lr_embedder": row.lr_embedder,
            "lr_generator": row.lr_generator,
            "started": row.started.isoformat() if row.started else None,
            "completed": row.completed.isoformat() if row.completed else None,
            "metrics": dict(row.metrics),
            **{
                key: value
                for key, value in row.attrs.items()
                if key not in ("metrics", "method", "stage")
            },
        }
        for row in report.trials
    ]


# --- loading ---------------------------------------------------------------------------------------


def _group_name(summary: FrozenStudy) -> str:
    return summary.user_attrs.get(GROUP_ATTR) or summary.study_name


def _report(
    storage: optuna.storages.BaseStorage,
    name: str,
    summaries: Sequence[FrozenStudy],
) -> StudyReport:
    spec = _stored_spec(summaries)
    plan = _plan_of(spec)
    order = [stage.name for stage in plan.stages] if plan else []
    by_stage = {s.user_attrs.get(STAGE_ATTR) or s.study_name: s for s in summaries}
    stages = tuple(
        sorted(by_stage, key=lambda st: (order.index(st) if st in order else len(order), st))
    )
    trials: list[TrialRow] = []
    for stage in stages:
        study_id = storage.get_study_id_from_name(by_stage[stage].study_name)
        trials += [_row(stage, trial) for trial in storage.get_all_trials(study_id, deepcopy=False)]
    return StudyReport(name=name, stages=stages, trials=tuple(trials), spec=spec, plan=plan)


def _stored_spec(summaries: Sequence[FrozenStudy]) -> StudySpec | None:
    for summary in summaries:
        if SPEC_ATTR in summary.system_attrs:
            try:
                return StudySpec.model_validate(summary.system_attrs[SPEC_ATTR])
            except ValidationError:
                return None  # written by another ragsweep version: report without the plan
    return None


def _plan_of(spec: StudySpec | None) -> Plan | None:
    if spec is None:
        return None
    try:
        return make_plan(spec)
    except ConfigError:
        return None


def _row(stage: str, trial: optuna.trial.FrozenTrial) -> TrialRow:
    attrs = trial.user_attrs
    config = (attrs.get("record") or {}).get("config", {})
    # Searched rates are parameters; rates a stage took from an earlier one are only in the record.
    rates = {
        rate: trial.params.get(rate, config.get(rate)) for rate in ("lr_embedder", "lr_generator")
    }
    return TrialRow(
        stage=stage,
        number=trial.number,
        method=attrs.get("method") or stage,
        state=trial.state.name,
        lr_embedder=rates["lr_embedder"],
        lr_generator=rates["lr_generator"],
        metrics=attrs.get("metrics") or {},
        fail_reason=attrs.get("fail_reason"),
        attrs=attrs,
        started=trial.datetime_start,
        completed=trial.datetime_complete,
    )


# --- small helpers ---------------------------------------------------------------------------------


def _summarize(name: str, report: StudyReport) -> StudySummary:
    completed = [row for row in report.trials if row.state == "COMPLETE" and "f1" in row.metrics]
    return StudySummary(
        name=name,
        methods=report.methods,
        states=Counter(row.state for row in report.trials),
        best_f1=max((row.metrics["f1"] for row in completed), default=None),
        train_flops=report.spent(report.stages, "train_flops"),
        train_device_s=report.spent(report.stages, "train_device_s"),
    )


def quality_key(metric: str) -> str:
    """The metric key trials report for a --metric name (f1, em, recall)."""
    if metric not in QUALITY:
        _unknown("metric", metric, list(QUALITY))
    return QUALITY[metric]


def _check_cost(cost: str) -> None:
    if cost not in COSTS:
        _unknown("cost", cost, list(COSTS))


def _unknown(what: str, value: str, choices: Sequence[str]) -> None:
    raise ConfigError(f"{what} '{value}' is not one of: {', '.join(choices)}")
