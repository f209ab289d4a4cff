"""What ``ragsweep export`` writes: every trial with every recorded attribute, or a row per trial
and validation question (``--per-question``); ``best --format json`` gives one trial's row."""

from __future__ import annotations

from typing import Any

from search.query.report import StudyReport
from search.store import TrialRecord

__all__ = ["export_row", "export_rows", "question_rows"]


def export_rows(report: StudyReport) -> list[dict[str, Any]]:
    """Every trial with every recorded attribute, nested as stored (JSON) or flat (CSV)."""
    return [export_row(report, row) for row in report.trials]


def export_row(report: StudyReport, row: TrialRecord) -> dict[str, Any]:
    """One trial with every recorded attribute (see :func:`export_rows`)."""
    return {
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
        **row.attributes(),
    }


def question_rows(report: StudyReport) -> list[dict[str, Any]]:
    """One row per trial and validation question, for every trial with stored per-question
    results (:attr:`TrialRecord.questions`), in trial then question order: the trial, its
    rates, and the question's id, prediction, EM, F1, recall (None without context labels) and
    retrieved ids."""
    rows = []
    for row in report.trials:
        for question in row.questions or ():
            rows.append(
                {
                    "stage": row.stage,
                    "trial": row.id,
                    "method": row.method,
                    "lr_embedder": row.lr_embedder,
                    "lr_generator": row.lr_generator,
                    "question_id": question.id,
                    "prediction": question.prediction,
                    "em": question.em,
                    "f1": question.f1,
                    "recall": question.recall,
                    "retrieved": list(question.retrieved),
                }
            )
    return rows
