"""The study database: Optuna storage URLs, one Optuna study per stage, and trial records.

Layout (readable by ``optuna studies`` and optuna-dashboard): the trials of a launch live in one
study per plan stage, named ``<spec name>/<stage>``; every such study carries the user attributes
``ragsweep.group`` (the spec name), ``ragsweep.stage`` and ``ragsweep.spec_hash`` (the full resolved
configuration is in every trial's ``record``, so the study listing stays readable).
What a trial stores is declared once, by :class:`TrialOutcome` (what a worker reports) and
:class:`TrialRecord` (what a reader gets): ``metrics`` (every figure the
trial reported), ``method``, ``stage``, ``record`` (resolved config, seed, data fingerprint,
split, versions, commit, hardware), ``checkpoint`` where later stages reuse it, and
``fail_reason`` (with ``retryable``) when it failed. :func:`trial_attrs` writes them,
:func:`read_trial` reads them back (:class:`StudyDatabase`, many at once for the queries),
:func:`best_trial` picks the best.

While a launch runs, its stage studies also carry ``ragsweep.launch`` (``search.launch._lease``).
"""

from search.metrics import COST_METRICS, HEADLINE_METRICS, METRIC_NAMES, QUALITY_METRICS
from search.store._database import StoredStudy, StudyDatabase, open_database
from search.store._outcome import TrialOutcome, rung_text
from search.store._questions import decode_questions, encode_questions
from search.store._studies import (
    GROUP_ATTR,
    SPEC_ATTR,
    STAGE_ATTR,
    StorageError,
    check_spec_matches,
    database_exists,
    existing_stage_study,
    mask_url,
    open_stage_study,
    open_storage,
    spec_hash,
    stage_study_name,
)
from search.store._trials import (
    TrialRecord,
    best_trial,
    fail_running_trials,
    finished_params,
    read_trial,
    read_trials,
    record_trial,
    trial_attrs,
)

__all__ = [
    "COST_METRICS",
    "GROUP_ATTR",
    "HEADLINE_METRICS",
    "METRIC_NAMES",
    "QUALITY_METRICS",
    "SPEC_ATTR",
    "STAGE_ATTR",
    "StorageError",
    "StoredStudy",
    "StudyDatabase",
    "TrialOutcome",
    "TrialRecord",
    "best_trial",
    "check_spec_matches",
    "database_exists",
    "decode_questions",
    "encode_questions",
    "existing_stage_study",
    "fail_running_trials",
    "finished_params",
    "mask_url",
    "open_database",
    "open_stage_study",
    "open_storage",
    "read_trial",
    "read_trials",
    "record_trial",
    "rung_text",
    "spec_hash",
    "stage_study_name",
    "trial_attrs",
]
