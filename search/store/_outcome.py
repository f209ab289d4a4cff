"""What a trial reports to the launch, which stores it as the trial's user attributes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["TRIAL_ATTRS", "TrialOutcome", "rung_text"]


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
    # A trial stopped early: the rung where it stopped (trainers.Rung.summary); its metrics are
    # then what it cost up to there.
    pruned_at: Mapping[str, Any] | None = None
    # A completed trial's per-question results (search.store._questions.encode_questions).
    per_question: str | None = None

    def to_json(self) -> str:
        """The outcome as JSON text, as a trial worker sends it to the launch."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialOutcome:
        return cls(**json.loads(text))

    def failed(self, reason: str, *, retryable: bool) -> TrialOutcome:
        """This outcome as a failure for ``reason``."""
        return replace(self, fail_reason=reason, retryable=retryable)


# The attribute keys a trial's outcome is stored under, in the order they are written.
TRIAL_ATTRS = tuple(f.name for f in fields(TrialOutcome))


def rung_text(pruned_at: Mapping[str, Any]) -> str:
    """Where a pruned trial stopped, in words: "rung 1: generator step 2/8, answer log-prob -2.31"."""
    where = f"{pruned_at.get('phase', '?')} step {pruned_at.get('step', '?')}/{pruned_at.get('steps', '?')}"
    # Studies stored before the passage signal keep the answer's under its own key.
    name = pruned_at.get("signal", "answer_logprob")
    value = pruned_at.get("value", pruned_at.get("answer_logprob"))
    label = _SIGNAL_LABELS.get(name, name)
    signal = f", {label} {value:.3g}" if isinstance(value, int | float) else ""
    return f"rung {pruned_at.get('rung', '?')}: {where}{signal}"


_SIGNAL_LABELS = {"answer_logprob": "answer log-prob", "gold_doc_rr": "passage reciprocal rank"}
