"""What a trial answered on each validation question: the unit per-question statistics read.

Plain dataclasses and JSON (no torch), so the query commands read stored results without
loading a model library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["QuestionResult", "questions_json"]


@dataclass(frozen=True)
class QuestionResult:
    """One validation question as a trial answered it: what per-question statistics read."""

    id: str
    # None where evaluation scored retrieval only (training.evaluate: retrieval)
    prediction: str | None
    em: float | None
    f1: float | None
    recall: float | None  # gold_found of its top-k; None without context labels
    retrieved: tuple[str, ...]  # the top-k document ids, best first


def questions_json(questions: Sequence[QuestionResult]) -> str:
    """``questions`` as canonical JSON (a list of objects, keys sorted, no spaces): what is stored
    and what its hash is taken of, so the same answers give the same text."""
    return json.dumps(
        [asdict(question) for question in questions], sort_keys=True, separators=(",", ":")
    )
