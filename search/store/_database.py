"""The study database opened for reading, as the query commands do: its studies and every trial
of a launch, read from Optuna's tables in a few plain SQL queries.

Optuna's own reading is built for a running study, not for a report over thousands of trials:
opening an ``RDBStorage`` checks the schema with alembic, and ``get_all_trials`` builds an ORM
object per stored row and decodes every attribute. Here a query per table reads a launch's trials
as rows, a trial's record stays JSON text until read (:class:`search.store.TrialRecord` decodes
it), and neither Optuna nor, for a SQLite file, SQLAlchemy is imported (importing SQLAlchemy
alone takes a fifth of a query over 5,000 trials). The tables and columns are Optuna's RDB schema
(version 12, ``optuna.storages._rdb.models``); ``tests/search/test_store.py`` checks, on SQLite
and PostgreSQL, that what is read here is what Optuna's API gives.
"""

from __future__ import annotations

import gc
import json
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from search.store._studies import (
    GROUP_ATTR,
    SPEC_ATTR,
    STAGE_ATTR,
    StorageError,
    engine_options,
    mask_url,
    missing_file,
)
from search.store._trials import UNREADABLE, TrialRecord, json_value, record_of, study_place
from trainers import one_line

_Rows = Callable[[str], list[tuple[Any, ...]]]  # runs one query, returns its rows
# Columns are named with their table's alias throughout: MySQL reserves "key", and a qualified
# name needs no quoting on any backend.


@dataclass(frozen=True)
class StoredStudy:
    """One Optuna study as ragsweep reads it: the launch it belongs to, its stage, its spec.

    Its attributes are read as :func:`search.store._trials.study_place` says; two studies of one
    launch that say the same stage (one copied with ``optuna copy-study``) both read, the one not
    named ``<launch>/<stage>`` with its name as its stage.
    """

    name: str  # the Optuna study name, e.g. demo/ft_gen
    group: str  # the launch (the spec's name); for a study ragsweep did not write, its name
    stage: str  # likewise
    spec: dict[str, Any] | None  # the spec it was launched with, as JSON; None when not stored
    # Why a stored spec is not read (not JSON, or not a JSON object); then spec is None.
    spec_problem: str | None = None


class StudyDatabase:
    """A study database opened for reading; nothing is written."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite_file = _sqlite_file(url)
        self._engine: Any = None  # a SQLAlchemy engine, for other databases
        self._errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        if self._sqlite_file is None:
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(url, **engine_options(url, create=False))
            self._errors = (sqlalchemy.exc.SQLAlchemyError,)
        elif self._sqlite_file.is_dir():
            raise StorageError(
                f"'{self._sqlite_file}' is a folder, not a database file; give --storage (or "
                f"RAGSWEEP_STORAGE) the file in it, e.g. sqlite:///{self._sqlite_file}/demo.db"
            )
        elif not self._sqlite_file.is_file():
            raise missing_file(url)

    def studies(self) -> list[StoredStudy]:
        """Every study in the database; reads no trial."""
        with self._reading() as rows:
            names = rows("SELECT s.study_id, s.study_name FROM studies s ORDER BY s.study_id")
            user = rows("SELECT a.study_id, a.key, a.value_json FROM study_user_attributes a")
            system = rows("SELECT a.study_id, a.key, a.value_json FROM study_system_attributes a")
        wanted = (GROUP_ATTR, STAGE_ATTR)
        attrs = {(i, key): json_value(text) for i, key, text in user if key in wanted}
        specs = {i: json_value(text) for i, key, text in system if key == SPEC_ATTR}
        studies = []
        for study_id, name in names:
            group, stage = study_place(
                str(name), attrs.get((study_id, GROUP_ATTR)), attrs.get((study_id, STAGE_ATTR))
            )
            spec, problem = _spec(specs.get(study_id))
            studies.append(StoredStudy(str(name), group, stage, spec, problem))
        return _distinct_stages(studies)

    def trials(self, studies: Sequence[StoredStudy]) -> list[TrialRecord]:
        """Every trial of ``studies``, study by study in that order, by number within each."""
        stages = {study.name: study.stage for study in studies}
        # Thousands of new objects, none of them in a cycle: the cycle collector would run over
        # and over while they are built, each pass scanning everything built so far.
        with _no_cycle_collection(), self._reading() as rows:
            ids = {
                name: study_id
                for study_id, name in rows("SELECT s.study_id, s.study_name FROM studies s")
                if name in stages
            }
            if not ids:
                return []
            # Study ids are integers read from the database: written into the query as such.
            of_studies = f"t.study_id IN ({', '.join(str(int(i)) for i in ids.values())})"
            of_trials = f"a.trial_id IN (SELECT t.trial_id FROM trials t WHERE {of_studies})"
            trials = rows(
                "SELECT t.trial_id, t.number, t.study_id, t.state, t.datetime_start, "
                f"t.datetime_complete FROM trials t WHERE {of_studies} ORDER BY t.trial_id"
            )
            params = rows(
                "SELECT a.trial_id, a.param_name, a.param_value, a.distribution_json "
                f"FROM trial_params a WHERE {of_trials} ORDER BY a.param_id"
            )
            attrs = rows(
                f"SELECT a.trial_id, a.key, a.value_json FROM trial_user_attributes a WHERE {of_trials}"
            )
            trial_params: dict[int, dict[str, Any]] = {}
            for trial_id, name, value, distribution_json in params:
                external = _external(value, distribution_json)
                if external is not UNREADABLE:
                    trial_params.setdefault(trial_id, {})[name] = external
            trial_attrs: dict[int, dict[str, str]] = {}
            for trial_id, key, text in attrs:
                trial_attrs.setdefault(trial_id, {})[key] = text
            stage_of = {study_id: stages[name] for name, study_id in ids.items()}
            order = {ids[name]: index for index, name in enumerate(stages) if name in ids}
            # sorted is stable: trial_id order, which is number order, stays within a study.
            return [
                record_of(
                    stage_of[study_id],
                    number,
                    state,
                    trial_params.get(trial_id, {}),
                    _local_time(started),
                    _local_time(completed),
                    trial_attrs.get(trial_id, {}),
                    json_text=True,
                )
                for trial_id, number, study_id, state, started, completed in sorted(
                    trials, key=lambda row: order[row[2]]
                )
            ]

    @contextmanager
    def _reading(self) -> Iterator[_Rows]:
        try:
            if self._sqlite_file is not None:
                # Read-only (SQLite's mode=ro): a query never writes to the file, whatever it is.
                uri = f"{self._sqlite_file.absolute().as_uri()}?mode=ro"
                with closing(sqlite3.connect(uri, uri=True, timeout=60)) as connection:
                    yield lambda sql: connection.execute(sql).fetchall()
            else:
                with self._engine.connect() as connection:
                    yield lambda sql: [tuple(row) for row in connection.exec_driver_sql(sql)]
        except self._errors as e:  # the server is unreachable, the tables are not Optuna's
            raise self._unreadable(e) from e

    def _unreadable(self, error: Exception) -> StorageError:
        if self._sqlite_file is None:
            return StorageError(
                f"cannot read storage '{mask_url(self.url)}': {one_line(error)}; check that the "
                "server is up and that the URL names a study database"
            )
        if "locked" in str(error):
            return StorageError(
                f"cannot read '{self._sqlite_file}': {one_line(error)} (a launch is writing it); "
                "try again in a moment"
            )
        if "unable to open" in str(error):
            return StorageError(
                f"cannot open '{self._sqlite_file}': {one_line(error)}; check that you may read "
                "the file"
            )
        # Not SQLite (a text file), or none of Optuna's tables (empty, another program's file).
        return StorageError(
            f"'{self._sqlite_file}' is not a study database ({one_line(error)}); give --storage "
            "(or RAGSWEEP_STORAGE) the SQLite file a launch or Optuna wrote"
        )


def open_database(url: str) -> StudyDatabase:
    """The study database ``url`` for reading; a SQLite file that is not there is an error."""
    try:
        return StudyDatabase(url)
    except ImportError as e:  # a missing driver
        raise StorageError(
            f"cannot open storage '{mask_url(url)}': {one_line(e)}; install the database driver"
        ) from e


def _sqlite_file(url: str) -> Path | None:
    """The file of a plain ``sqlite:///<path>`` URL, read as SQLAlchemy reads it; None for any
    other URL (those go through SQLAlchemy)."""
    match = re.fullmatch(r"sqlite:///([^?]+)", url)
    return Path(unquote(match.group(1))) if match else None


def _external(value: float, distribution_json: str) -> Any:
    """A parameter's value as Optuna gives it (``BaseDistribution.to_external_repr``), or
    UNREADABLE when its distribution is not one Optuna reads (the parameter is left out)."""
    try:
        if _is_float(distribution_json):
            return value  # what ragsweep searches: the stored float itself
        import optuna  # other kinds (categorical, int) only in studies ragsweep did not write

        distribution = optuna.distributions.json_to_distribution(distribution_json)
        return distribution.to_external_repr(value)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return UNREADABLE


@lru_cache(maxsize=64)  # one per searched rate and range
def _is_float(distribution_json: str) -> bool:
    return bool(json.loads(distribution_json).get("name") == "FloatDistribution")


def _spec(stored: object) -> tuple[dict[str, Any] | None, str | None]:
    """A study's spec attribute as stored -> (the spec as JSON, why it is not read)."""
    if stored is None:
        return None, None
    if stored is UNREADABLE:
        return None, "is not JSON"
    if not isinstance(stored, dict):
        return None, f"is a JSON {type(stored).__name__}, not an object"
    return stored, None


def _distinct_stages(studies: list[StoredStudy]) -> list[StoredStudy]:
    """The studies, each stage of a launch held by one: of studies that say the same stage, the
    one named ``<launch>/<stage>`` (else the first) keeps it, the others read with their names."""
    holders: dict[tuple[str, str], StoredStudy] = {}
    for study in studies:
        place = (study.group, study.stage)
        if place not in holders or study.name == f"{study.group}/{study.stage}":
            holders[place] = study
    return [
        study if holders[(study.group, study.stage)] is study else replace(study, stage=study.name)
        for study in studies
    ]


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _local_time(utc: datetime | str | None) -> datetime | None:
    # Optuna's RDB storage keeps naive UTC (SQLite: as text) and hands out naive local time; a
    # time that is not one reads as not recorded.
    if isinstance(utc, str):
        try:
            utc = datetime.fromisoformat(utc)
        except ValueError:
            return None
    if not isinstance(utc, datetime):
        return None
    return utc.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)
