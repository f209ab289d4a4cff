"""What a trial stores: the record type, its one writer and one reader, and the one rule that
picks the best trial. What a trial reports is :class:`search.store._outcome.TrialOutcome`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from search.store._outcome import TRIAL_ATTRS, TrialOutcome
from search.store._questions import decode_questions
from search.store._studies import GROUP_ATTR, STAGE_ATTR
from trainers import QuestionResult

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class StoredJson:
    """A stored record still in its JSON text."""

    text: str


_DECODER = json.JSONDecoder()
# How a record's JSON begins as trainers write it (config first) and Optuna stores it (json.dumps).
_CONFIG_FIRST = '{"config": '
# What json_value gives for text that is not JSON.
UNREADABLE: Any = object()


@dataclass(frozen=True)
class TrialRecord:
    """One stored trial: Optuna's part (number, state, parameters, times) and every user attribute
    ragsweep writes, typed. :func:`trial_attrs` writes it; :func:`read_trial` reads it.

    Every field and property has the type it says, whatever the database holds: a value of
    another kind (written by another program, an older ragsweep or a hand edit) reads as not
    recorded; :func:`record_of` says how, case by case.
    """

    stage: str  # the stage study the trial is in
    number: int
    state: str  # COMPLETE, FAIL, RUNNING, WAITING or PRUNED
    params: Mapping[str, Any]  # the searched learning rates (Optuna parameters)
    started: datetime | None
    completed: datetime | None
    method: str  # the method trained; for a trial ragsweep did not write, the stage
    metrics: Mapping[str, float]  # every figure it reported that is a finite number ({} when none)
    checkpoint: str | None  # where its models are, when a later stage reuses them
    fail_reason: str | None
    retryable: bool | None  # with a failure: whether a relaunch runs the trial again
    node: str | None  # the Ray node that ran it
    pruned_at: Mapping[str, Any] | None  # a PRUNED trial's rung: rung, phase, step, steps, value
    per_question: str | None  # its per-question results, encoded; see :attr:`questions`
    other_attrs: Mapping[str, Any]  # user attributes ragsweep does not write, as stored
    # The record as stored (any JSON value), or its JSON text until first read (kilobytes; few
    # queries need it).
    _record: object = field(repr=False, compare=False)

    @property
    def id(self) -> str:
        """``<stage>/<number>``, as the query commands name trials."""
        return f"{self.stage}/{self.number}"

    @cached_property
    def record(self) -> dict[str, Any]:
        """Resolved config, seed, data fingerprint, split, phases, environment ({} when none is
        stored, or what is stored is not a JSON object)."""
        stored = self._stored_record
        return stored if isinstance(stored, dict) else {}

    @cached_property
    def questions(self) -> tuple[QuestionResult, ...] | None:
        """Each validation question's prediction, EM, F1, recall and retrieved ids, in the
        order evaluated; None when not stored (a trial stored before them, failed or stopped) or
        when what is stored does not match the hash its record keeps."""
        if self.per_question is None:
            return None
        return decode_questions(self.per_question, _text(self.record.get("questions_sha256")))

    @cached_property
    def config(self) -> dict[str, Any]:
        """The resolved trial config (``trainers.TrialConfig`` as JSON; {} when not recorded or
        not a JSON object)."""
        stored = self._record
        config: object
        if (
            "record" not in self.__dict__
            and isinstance(stored, StoredJson)
            and stored.text.startswith(_CONFIG_FIRST)
        ):
            # Decode the config alone, under half the record: listing trials reads every one's
            # config (its rates and reused phases) and no other part.
            try:
                config, _ = _DECODER.raw_decode(stored.text, len(_CONFIG_FIRST))
            except ValueError:  # not JSON: no record to read
                config = None
        else:
            config = self.record.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def lr_embedder(self) -> float | None:
        return self._rate("lr_embedder")

    @property
    def lr_generator(self) -> float | None:
        return self._rate("lr_generator")

    @property
    def reuse(self) -> dict[str, str]:
        """Phase -> the checkpoint folder the trial loaded that phase from ({} unless the config
        maps names to folders)."""
        reuse = self.config.get("reuse")
        if isinstance(reuse, dict) and all(isinstance(folder, str) for folder in reuse.values()):
            return reuse
        return {}

    @property
    def has_context_labels(self) -> bool:
        """Whether the trial's data had gold passages (recorded as true)."""
        return self.record.get("has_context_labels") is True

    @property
    def data_fingerprint(self) -> str | None:
        """The fingerprint of the data the trial read, when recorded as text."""
        return _text(self.record.get("data_fingerprint"))

    @property
    def environment(self) -> dict[str, Any]:
        """Versions, commit and hardware the trial ran on ({} when not a JSON object)."""
        environment = self.record.get("environment")
        return environment if isinstance(environment, dict) else {}

    @property
    def phases(self) -> list[str]:
        """The method's phases, in order ([] unless recorded as a list of names)."""
        return _names(self.record.get("phases"))

    @property
    def reused_phases(self) -> list[str]:
        """The phases loaded from an earlier stage's checkpoint ([] unless a list of names)."""
        return _names(self.record.get("reused_phases"))

    def attributes(self) -> dict[str, Any]:
        """Every stored user attribute but metrics, method and stage, by name: the record as
        stored (its text when that is not JSON), the others as read."""
        declared = {
            "record": None if self._record is None else self._stored_record,
            "checkpoint": self.checkpoint,
            "fail_reason": self.fail_reason,
            "retryable": self.retryable,
            "node": self.node,
            "pruned_at": self.pruned_at,
            "per_question": self.per_question,
        }
        stored = {k: v for k, v in declared.items() if v is not None} | dict(self.other_attrs)
        # By name, as Optuna reads them from SQLite (its index on trial and name), on every backend.
        return dict(sorted(stored.items()))

    @cached_property
    def _stored_record(self) -> object:
        stored = self._record
        if not isinstance(stored, StoredJson):
            return stored
        value = json_value(stored.text)
        return stored.text if value is UNREADABLE else value

    def _rate(self, rate: str) -> float | None:
        # Searched rates are parameters; a rate the stage took from an earlier one is in the record.
        return _number(self.params[rate] if rate in self.params else self.config.get(rate))


def trial_attrs(outcome: TrialOutcome) -> dict[str, Any]:
    """The user attributes stored for what a trial reported (fields without a value left out)."""
    return {key: getattr(outcome, key) for key in TRIAL_ATTRS if getattr(outcome, key) is not None}


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
    _, stage = study_place(
        study.study_name, study.user_attrs.get(GROUP_ATTR), study.user_attrs.get(STAGE_ATTR)
    )
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
    """Parameters of trials that need no re-run: completed ones, failures that would recur, and
    trials early stopping stopped while the stage has a completed one to build on.

    A trial that failed by itself (diverged, bad config) fails again the same way, so a relaunch
    skips it; one whose worker died or whose driver was killed is ``retryable`` and runs again. A
    stage whose trials were all stopped or failed (the one that went on failed after its last
    rung) runs its stopped points again rather than stay without a result.
    """
    trials = read_trials(study)
    finished = (
        ["COMPLETE", "PRUNED"] if any(t.state == "COMPLETE" for t in trials) else ["COMPLETE"]
    )
    return [
        dict(trial.params)
        for trial in trials
        if trial.state in finished or (trial.state == "FAIL" and not trial.retryable)
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
    as stored, JSON text; then the record is decoded on first use.

    What is stored is not trusted: another program, an older ragsweep or a hand edit may have
    written it. A declared attribute that is not JSON, or not of its kind, reads as not recorded,
    so that the trial is listed with what it has: ``metrics`` keeps the figures that are finite
    numbers (a trial without a figure shows a blank and is never best on it), a ``method`` that is
    not a name is the stage's, ``checkpoint``, ``fail_reason`` and ``node`` are text or None,
    ``retryable`` true, false or None (a relaunch retries only a failure marked retryable). The
    record reads as {} unless a JSON object, and so do its config and parts
    (:class:`TrialRecord`). Attributes ragsweep does not write are kept as stored (their text when
    it is not JSON). A command that needs a value refuses the trial in one line (``reproduce``
    one without a config); none refuses the listing.
    """
    stored: dict[str, Any]
    if json_text:
        stored = {}
        for key, text in attrs.items():
            if key != "record":
                value = json_value(text)
                if value is not UNREADABLE:
                    stored[key] = value
                elif key not in TRIAL_ATTRS:
                    stored[key] = text
        record = attrs.get("record")
        stored_record: object = StoredJson(record) if isinstance(record, str) else None
    else:
        stored, stored_record = dict(attrs), attrs.get("record")
    return TrialRecord(
        stage=stage,
        number=number,
        state=state,
        params=params,
        started=started,
        completed=completed,
        method=_text(stored.get("method")) or stage,
        metrics=_figures(stored.get("metrics")),
        checkpoint=_text(stored.get("checkpoint")),
        fail_reason=_text(stored.get("fail_reason")),
        retryable=_flag(stored.get("retryable")),
        node=_text(stored.get("node")),
        pruned_at=_mapping(stored.get("pruned_at")),
        per_question=_text(stored.get("per_question")),
        other_attrs={key: value for key, value in stored.items() if key not in TRIAL_ATTRS},
        _record=stored_record,
    )


def json_value(text: object) -> Any:
    """Stored JSON text decoded, or :data:`UNREADABLE` when it is not JSON (written around
    Optuna, which stores only ``json.dumps``)."""
    try:
        return json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return UNREADABLE


def study_place(name: str, group: object, stage: object) -> tuple[str, str]:
    """(launch, stage) of the study ``name`` from its group and stage attributes as stored.

    One that is not text reads from the name, which ragsweep writes as ``<group>/<stage>``; a
    study without either attribute (one ragsweep did not write) is a launch of one stage, both
    its name.
    """
    group_name, stage_name = _text(group), _text(stage)
    if group_name is None and stage_name is not None and name.endswith(f"/{stage_name}"):
        group_name = name.removesuffix(f"/{stage_name}")
    if stage_name is None and group_name is not None and name.startswith(f"{group_name}/"):
        stage_name = name.removeprefix(f"{group_name}/")
    return group_name or name, stage_name or name


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _number(value: object) -> float | None:
    """A rate as a float; None for anything but a finite number (text, true, NaN)."""
    if type(value) not in (float, int):
        return None
    try:
        rate = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer too large for a float
        return None
    return rate if rate - rate == 0.0 else None


def _mapping(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _names(value: object) -> list[str]:
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return value
    return []


def _figures(value: object) -> dict[str, float]:
    """The finite numbers of a stored metrics object ({} when it is not one)."""
    if not isinstance(value, dict):
        return {}
    figures = value.values()
    # The usual case, in two C loops: every figure a number and their sum finite.
    if set(map(type, figures)) <= {float, int}:
        try:
            total: float = sum(figures)
        except OverflowError:  # an integer too large for a float
            total = float("inf")
        if total - total == 0.0:
            return value
    return {
        name: figure
        for name, figure in value.items()
        if type(figure) is int or (type(figure) is float and figure - figure == 0.0)
    }
