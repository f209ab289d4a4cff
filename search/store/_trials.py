"""What a trial stores: its metrics' names, the record type, its one writer and one reader, and
the one rule that picks the best trial."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from search.store._studies import STAGE_ATTR

if TYPE_CHECKING:
    import optuna

# The figures every trial reports (trainers.evaluate and trainers.cost), by kind.
# Validation quality, higher is better:
QUALITY_METRICS: tuple[str, ...] = ("em", "f1", "recall_at_k")
# Cost; train_* count only the phases the trial trained itself. A trial also reports each
# phase's own figures as "<phase>.<figure>" (``generator.flops``).
COST_METRICS: tuple[str, ...] = (
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
# What `ragsweep train` shows first of one trial's figures (then each phase's own).
HEADLINE_METRICS: tuple[str, ...] = (
    *QUALITY_METRICS,
    "wall_s",
    "train_wall_s",
    "device_s",
    "tokens",
    "flops",
    "peak_mem_mb",
    "index_build_s",
    "index_cache_hit",
)
# --metric names users type -> the quality metric trials report.
METRIC_NAMES: dict[str, str] = {
    "f1": "f1",
    "em": "em",
    "recall": "recall_at_k",
    "recall_at_k": "recall_at_k",
}


@dataclass(frozen=True)
class TrialOutcome:
    """What a trial reports, stored as its user attributes by :func:`record_trial` (a field left
    None is not stored): a finished trial's figures, record and checkpoint, or why it failed.
    The fields, in the order they are written, are the attribute keys; :class:`TrialRecord` has a
    field of each name but ``stage`` (the stage study the trial is in stands for it)."""

    metrics: Mapping[str, float] | None = None
    method: str | None = None
    stage: str | None = None
    record: Mapping[str, Any] | None = None  # resolved config, seed, data fingerprint, versions
    checkpoint: str | None = None
    fail_reason: str | None = None
    retryable: bool | None = None  # with a failure: whether a relaunch runs the trial again
    node: str | None = None

    def to_json(self) -> str:
        """The outcome as JSON text, as a trial worker sends it to the launch."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialOutcome:
        return cls(**json.loads(text))

    def failed(self, reason: str, *, retryable: bool) -> TrialOutcome:
        """This outcome as a failure for ``reason``."""
        return replace(self, fail_reason=reason, retryable=retryable)


_TRIAL_ATTRS = tuple(f.name for f in fields(TrialOutcome))


@dataclass(frozen=True)
class StoredJson:
    """A stored record still in its JSON text."""

    text: str


_DECODER = json.JSONDecoder()
# How a record's JSON begins as trainers write it (config first) and Optuna stores it (json.dumps).
_CONFIG_FIRST = '{"config": '


@dataclass(frozen=True)
class TrialRecord:
    """One stored trial: Optuna's part (number, state, parameters, times) and every user attribute
    ragsweep writes, typed. :func:`trial_attrs` writes it; :func:`read_trial` reads it."""

    stage: str  # the stage study the trial is in
    number: int
    state: str  # COMPLETE, FAIL, RUNNING, WAITING or PRUNED
    params: Mapping[str, Any]  # the searched learning rates (Optuna parameters)
    started: datetime | None
    completed: datetime | None
    method: str  # the method trained; for a trial ragsweep did not write, the stage
    metrics: Mapping[str, float]  # every figure it reported ({} when none)
    checkpoint: str | None  # where its models are, when a later stage reuses them
    fail_reason: str | None
    retryable: bool | None  # with a failure: whether a relaunch runs the trial again
    node: str | None  # the Ray node that ran it
    other_attrs: Mapping[str, Any]  # user attributes ragsweep does not write, as stored
    # The record as stored, or its JSON text until first read (kilobytes; few queries need it).
    _record: dict[str, Any] | StoredJson | None = field(repr=False, compare=False)

    @property
    def id(self) -> str:
        """``<stage>/<number>``, as the query commands name trials."""
        return f"{self.stage}/{self.number}"

    @cached_property
    def record(self) -> dict[str, Any]:
        """Resolved config, seed, data fingerprint, split, phases, environment ({} when none)."""
        stored = self._record
        decoded: dict[str, Any] | None = (
            json.loads(stored.text) if isinstance(stored, StoredJson) else stored
        )
        return decoded or {}

    @cached_property
    def config(self) -> dict[str, Any]:
        """The resolved trial config (``trainers.TrialConfig`` as JSON; {} when not recorded)."""
        stored = self._record
        if (
            "record" not in self.__dict__
            and isinstance(stored, StoredJson)
            and stored.text.startswith(_CONFIG_FIRST)
        ):
            # Decode the config alone, under half the record: listing trials reads every one's
            # config (its rates and reused phases) and no other part.
            config, _ = _DECODER.raw_decode(stored.text, len(_CONFIG_FIRST))
        else:
            config = self.record.get("config")
        return config or {}

    @property
    def lr_embedder(self) -> float | None:
        return self._rate("lr_embedder")

    @property
    def lr_generator(self) -> float | None:
        return self._rate("lr_generator")

    @property
    def reuse(self) -> dict[str, str]:
        """Phase -> the checkpoint folder the trial loaded that phase from."""
        reuse: dict[str, str] = self.config.get("reuse") or {}
        return reuse

    @property
    def has_context_labels(self) -> bool:
        """Whether the trial's data had gold passages."""
        return bool(self.record.get("has_context_labels"))

    def attributes(self) -> dict[str, Any]:
        """Every stored user attribute but metrics, method and stage, as stored, by name."""
        declared = {
            "record": None if self._record is None else self.record,
            "checkpoint": self.checkpoint,
            "fail_reason": self.fail_reason,
            "retryable": self.retryable,
            "node": self.node,
        }
        stored = {k: v for k, v in declared.items() if v is not None} | dict(self.other_attrs)
        # By name, as Optuna reads them from SQLite (its index on trial and name), on every backend.
        return dict(sorted(stored.items()))

    def _rate(self, rate: str) -> float | None:
        # Searched rates are parameters; a rate the stage took from an earlier one is in the record.
        return self.params[rate] if rate in self.params else self.config.get(rate)


def trial_attrs(outcome: TrialOutcome) -> dict[str, Any]:
    """The user attributes stored for what a trial reported (fields without a value left out)."""
    return {key: getattr(outcome, key) for key in _TRIAL_ATTRS if getattr(outcome, key) is not None}


def record_trial(trial: optuna.Trial, outcome: TrialOutcome) -> None:
    """Store what a trial reported (metrics, record, checkpoint, failure) as its user attributes."""
    for key, value in trial_attrs(outcome).items():
        trial.set_user_attr(key, value)


def read_trial(stage: str, trial: optuna.trial.FrozenTrial) -> TrialRecord:
    """The record of one of Optuna's trials, in stage ``stage``."""
    return record_of(
        stage,
        trial.number,
        trial.state.name,
        trial.params,
        trial.datetime_start,
        trial.datetime_complete,
        trial.user_attrs,
    )


def read_trials(
    study: optuna.Study, states: Sequence[optuna.trial.TrialState] | None = None
) -> list[TrialRecord]:
    """The records of ``study``'s trials (of ``states``, when given), by number."""
    stage = study.user_attrs.get(STAGE_ATTR) or study.study_name
    frozen = study.get_trials(deepcopy=False, states=states)
    return [read_trial(stage, trial) for trial in frozen]


def best_trial(
    trials: Iterable[TrialRecord], metric: str, *, maximize: bool = True
) -> TrialRecord | None:
    """The completed trial with the highest ``metric`` (lowest unless ``maximize``), or None.

    Ties go to the earliest in ``trials`` (stage order, then number), so the trial later stages
    build on is the one every relaunch and every query shows.
    """
    completed = [t for t in trials if t.state == "COMPLETE" and metric in t.metrics]
    sign = 1.0 if maximize else -1.0
    return max(completed, key=lambda t: sign * t.metrics[metric], default=None)  # first of equals


def finished_params(study: optuna.Study) -> list[dict[str, Any]]:
    """Parameters of trials that need no re-run: completed ones, and failures that would recur.

    A trial that failed by itself (diverged, bad config) fails again the same way, so a relaunch
    skips it; one whose worker died or whose driver was killed is ``retryable`` and runs again.
    """
    return [
        dict(trial.params)
        for trial in read_trials(study)
        if trial.state == "COMPLETE" or (trial.state == "FAIL" and not trial.retryable)
    ]


def fail_running_trials(study: optuna.Study, reason: str) -> list[int]:
    """Fail (retryable, with ``reason``) every RUNNING trial of ``study``; their numbers."""
    import optuna

    failed = []
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # Optuna has no public way from a FrozenTrial to a Trial whose attributes can be set.
        trial = optuna.Trial(study, frozen._trial_id)
        try:
            record_trial(trial, TrialOutcome(fail_reason=reason, retryable=True))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile: nothing to fail
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        failed.append(frozen.number)
    return failed


def record_of(
    stage: str,
    number: int,
    state: str,
    params: Mapping[str, Any],
    started: datetime | None,
    completed: datetime | None,
    attrs: Mapping[str, Any],
    *,
    json_text: bool = False,
) -> TrialRecord:
    """The one reader of trial attributes: ``attrs`` as Optuna decodes them, or (``json_text``)
    as stored, JSON text; then the record is decoded on first use."""
    if json_text:
        stored = {key: json.loads(text) for key, text in attrs.items() if key != "record"}
        record = attrs.get("record")
        stored_record = None if record is None else StoredJson(record)
    else:
        stored, stored_record = dict(attrs), attrs.get("record")
    return TrialRecord(
        stage=stage,
        number=number,
        state=state,
        params=params,
        started=started,
        completed=completed,
        method=stored.get("method") or stage,
        metrics=stored.get("metrics") or {},
        checkpoint=stored.get("checkpoint"),
        fail_reason=stored.get("fail_reason"),
        retryable=stored.get("retryable"),
        node=stored.get("node"),
        other_attrs={key: value for key, value in stored.items() if key not in _TRIAL_ATTRS},
        _record=stored_record,
    )
