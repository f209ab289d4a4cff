"""The study database: Optuna storage URLs, one Optuna study per stage, and trial records.

Layout (readable by ``optuna studies`` and optuna-dashboard): the trials of a launch live in one
study per plan stage, named ``<spec name>/<stage>``; every such study carries the user attributes
``ragsweep.group`` (the spec name), ``ragsweep.stage`` and ``ragsweep.spec_hash`` (the full resolved
configuration is in every trial's ``record``, so the study listing stays readable).
Each trial carries ``metrics`` (every figure the trial reported), ``method``, ``stage``, ``record``
(resolved config, seed, data fingerprint, split, versions, commit, hardware), ``checkpoint`` where
later stages reuse it, and ``fail_reason`` (with ``retryable``) when it failed.

While a launch runs, its stage studies also carry ``ragsweep.launch`` (``search.launch._lease``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError

from search.spec import StudySpec
from trainers.errors import ConfigError, RagsweepError, one_line

__all__ = [
    "GROUP_ATTR",
    "SPEC_ATTR",
    "STAGE_ATTR",
    "StorageError",
    "best_trial",
    "check_spec_matches",
    "existing_stage_study",
    "fail_running_trials",
    "finished_params",
    "mask_url",
    "objective_values",
    "open_stage_study",
    "open_storage",
    "record_trial",
    "spec_hash",
    "stage_study_name",
    "trial_attrs",
    "waiting_params",
]

GROUP_ATTR = "ragsweep.group"
STAGE_ATTR = "ragsweep.stage"
SPEC_ATTR = "ragsweep.spec"
_HASH_ATTR = "ragsweep.spec_hash"
# What decides a trial's result; changing anything else (methods, storage, concurrency,
# resources) keeps the existing trials valid.
_RESULT_FIELDS = ("seed", "data", "models", "training", "search", "objectives")


class StorageError(RagsweepError):
    """The study database cannot be opened or written."""


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for every message and log line."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage (SQLAlchemy), refusing unknown schemes and unreachable servers."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StorageError(
            f"storage '{mask_url(url)}' is not a database URL; use sqlite:///path.db or postgresql://user@host/db"
        ) from e
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql"):
        raise StorageError(
            f"storage scheme '{parsed.drivername}' is not supported; use sqlite:///path.db or postgresql://user@host/db"
        )
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        try:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"cannot create the folder of '{mask_url(url)}': {one_line(e)}; "
                "put the database file in a folder you can write"
            ) from e
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 60}  # concurrent launches wait for the lock
    try:
        return _rdb_storage(url, engine_kwargs)
    except Exception as e:  # SQLAlchemy OperationalError, a missing driver (ImportError), ...
        raise StorageError(
            f"cannot open storage '{mask_url(url)}': {one_line(e)}; check that the server is up and the URL is right"
        ) from e


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except IntegrityError:
        # Two launches creating the same new database race to write its schema version; the
        # loser finds the schema in place on a second try.
        time.sleep(0.5)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def stage_study_name(spec: StudySpec, stage: str) -> str:
    return f"{spec.name}/{stage}"


def spec_hash(spec: StudySpec) -> str:
    """Hash of the spec fields that decide trial results."""
    result_fields = spec.model_dump(mode="json", include=set(_RESULT_FIELDS))
    return hashlib.sha256(json.dumps(result_fields, sort_keys=True).encode()).hexdigest()[:16]


def open_stage_study(
    storage: optuna.storages.RDBStorage,
    spec: StudySpec,
    stage: str,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Create or load the study of one stage (call :func:`check_spec_matches` first)."""
    name = stage_study_name(spec, stage)
    directions = [objective.direction for objective in spec.objectives]
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=directions,
        sampler=sampler,
        load_if_exists=True,
    )
    if list(map(_direction_name, study.directions)) != directions:
        raise ConfigError(
            f"study '{name}' was created with other objectives; keep the spec's objectives or use another name"
        )
    if study.user_attrs.get(_HASH_ATTR) is None:
        study.set_user_attr(GROUP_ATTR, spec.name)
        study.set_user_attr(STAGE_ATTR, stage)
        study.set_user_attr(_HASH_ATTR, spec_hash(spec))
        # The whole spec, so reports can rebuild the plan; a system attribute keeps it out of
        # the study listings of `optuna studies` and the dashboard.
        storage.set_study_system_attr(
            storage.get_study_id_from_name(name), SPEC_ATTR, spec.model_dump(mode="json")
        )
    return study


def existing_stage_study(
    storage: optuna.storages.RDBStorage, spec: StudySpec, stage: str
) -> optuna.Study | None:
    """The stage's study if an earlier launch made it (nothing is written), else None."""
    try:
        return optuna.load_study(study_name=stage_study_name(spec, stage), storage=storage)
    except KeyError:
        return None


def check_spec_matches(storage: optuna.storages.RDBStorage, spec: StudySpec) -> None:
    """Refuse a spec whose name is already used in this database by a different spec."""
    expected = spec_hash(spec)
    # get_all_studies reads no trial (get_all_study_summaries reads every one to count them).
    for summary in storage.get_all_studies():
        if summary.user_attrs.get(GROUP_ATTR) == spec.name and summary.user_attrs.get(
            _HASH_ATTR
        ) not in (None, expected):
            raise ConfigError(
                f"study '{spec.name}' already exists in this database with a different spec; "
                "use another name (name: in the spec) or relaunch the spec it was made with"
            )


def record_trial(trial: optuna.Trial, payload: dict[str, Any]) -> None:
    """Write what a trial reported (metrics, record, checkpoint, failure reason) as user attributes."""
    for key, value in trial_attrs(payload).items():
        trial.set_user_attr(key, value)


def trial_attrs(payload: dict[str, Any]) -> dict[str, Any]:
    """The user attributes stored for what a trial reported (keys without a value left out)."""
    keys = (
        "metrics",
        "method",
        "stage",
        "record",
        "checkpoint",
        "fail_reason",
        "retryable",
        "node",
    )
    return {key: payload[key] for key in keys if payload.get(key) is not None}


def best_trial(study: optuna.Study, objective_index: int = 0) -> optuna.trial.FrozenTrial | None:
    """The completed trial best on the study's first objective (None when none completed)."""
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        return None
    sign = 1 if study.directions[objective_index] == optuna.study.StudyDirection.MAXIMIZE else -1
    # Ties go to the earliest trial, so the choice is the same on every relaunch.
    return max(completed, key=lambda t: (sign * t.values[objective_index], -t.number))


def finished_params(study: optuna.Study) -> list[dict[str, float]]:
    """Parameters of trials that need no re-run: completed ones, and failures that would recur.

    A trial that failed by itself (diverged, bad config) fails again the same way, so a relaunch
    skips it; one whose worker died or whose driver was killed is ``retryable`` and runs again.
    """
    return [
        trial.params
        for trial in study.get_trials(deepcopy=False)
        if trial.state == optuna.trial.TrialState.COMPLETE
        or (
            trial.state == optuna.trial.TrialState.FAIL
            and not trial.user_attrs.get("retryable", False)
        )
    ]


def objective_values(metrics: dict[str, float], objectives: Sequence[str]) -> list[float] | None:
    """The objective values from a trial's metrics; None when one is missing or not finite."""
    values = [metrics.get(name) for name in objectives]
    if any(value is None or value != value or abs(value) == float("inf") for value in values):
        return None
    return [float(value) for value in values]  # type: ignore[arg-type]


def waiting_params(study: optuna.Study) -> list[dict[str, Any]]:
    """Parameters of enqueued trials no launch has started yet (a killed launch leaves some)."""
    return [
        trial.system_attrs.get("fixed_params", {})
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    ]


def fail_running_trials(study: optuna.Study, reason: str) -> list[int]:
    """Fail (retryable, with ``reason``) every RUNNING trial of ``study``; their numbers."""
    failed = []
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial = optuna.Trial(study, frozen._trial_id)
        try:
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("retryable", True)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile: nothing to fail
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        failed.append(frozen.number)
    return failed


def _direction_name(direction: optuna.study.StudyDirection) -> str:
    return "maximize" if direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
