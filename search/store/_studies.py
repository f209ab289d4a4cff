"""Where studies live: the storage URL, and one Optuna study per plan stage.

Optuna and SQLAlchemy are imported where they are used: the query commands read a SQLite
database without either.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.spec import StudySpec
from trainers import ConfigError, RagsweepError, mask_secrets, one_line

if TYPE_CHECKING:
    import optuna

GROUP_ATTR = "ragsweep.group"
STAGE_ATTR = "ragsweep.stage"
SPEC_ATTR = "ragsweep.spec"
_HASH_ATTR = "ragsweep.spec_hash"
# What decides a trial's result; changing anything else (methods, storage, concurrency,
# resources) keeps the existing trials valid.
_RESULT_FIELDS = ("seed", "data", "models", "training", "search", "objectives")


class StorageError(RagsweepError):
    """The study database cannot be opened or written."""


class _MissingFile(StorageError):
    """A SQLite database file that is not there."""


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for every message and log line."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL SQLAlchemy reads: keep nothing before an "@"
        masked = mask_secrets(url)
        return masked if masked != url or "@" not in url else "***@" + url.rsplit("@", 1)[-1]


def open_storage(url: str, *, create: bool = True) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage (SQLAlchemy), refusing unknown schemes and unreachable servers.

    ``create=False`` is for reading: a SQLite file that is not there is an error, never created.
    """
    engine_kwargs = engine_options(url, create=create)
    try:
        return _rdb_storage(url, engine_kwargs)
    except Exception as e:  # SQLAlchemy OperationalError, a missing driver (ImportError), ...
        raise StorageError(
            f"cannot open storage '{mask_url(url)}': {one_line(e)}; check that the server is up and the URL is right"
        ) from e


def engine_options(url: str, *, create: bool) -> dict[str, Any]:
    """SQLAlchemy engine options for the study database ``url``, once the URL is checked: a
    supported scheme, and for SQLite a folder to hold the file (``create``) or the file itself."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

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
    if parsed.get_backend_name() != "sqlite":
        # A network cut that drops packets would otherwise hold each reconnect for the OS's TCP
        # timeout, past the wait a launch gives an unreachable database.
        # (psycopg and the MySQL drivers name it alike).
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    if not create and not (parsed.database and Path(parsed.database).is_file()):
        raise missing_file(url)
    if parsed.database:
        try:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"cannot create the folder of '{mask_url(url)}': {one_line(e)}; "
                "put the database file in a folder you can write"
            ) from e
    # Concurrent launches wait for the lock.
    return {"pool_pre_ping": True, "connect_args": {"timeout": 60}}


def database_exists(url: str) -> bool:
    """Whether ``url`` names a database that is there: a server's, or an existing SQLite file.
    The URL is checked as :func:`open_storage` checks it, and a SQLite file that is not there
    must be one this process can create; nothing is created."""
    import tempfile

    from sqlalchemy.engine import make_url

    try:
        engine_options(url, create=False)
    except _MissingFile:
        path = Path(str(make_url(url).database)).absolute()
        folder = next(parent for parent in path.parents if parent.exists())
        try:  # a file made and gone at once: the only sure test of a folder (root passes access())
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise StorageError(
                f"cannot create the database file {path}: {folder} is not a folder you can write "
                f"({e.strerror}); choose another --storage path"
            ) from None
        return False
    return True


def missing_file(url: str) -> StorageError:
    """The error for a SQLite ``url`` whose file is not there, when reading."""
    from sqlalchemy.engine import make_url

    return _MissingFile(
        f"database file '{make_url(url).database}' does not exist; check --storage "
        f"({mask_url(url)}) or launch a study there first"
    )


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError, ProgrammingError) as e:
            # Two launches creating the same new database race to create its tables ("table
            # studies already exists") or write its schema version; the loser finds the schema
            # in place on a later try. Any other error is the caller's to report.
            if not _lost_schema_race(e) or attempt == _SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


_SCHEMA_ATTEMPTS = 4


def _lost_schema_race(error: Exception) -> bool:
    from sqlalchemy.exc import IntegrityError

    return isinstance(error, IntegrityError) or "already exists" in str(error)


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
    import optuna

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
    import optuna

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


def _direction_name(direction: optuna.study.StudyDirection) -> str:
    return "maximize" if direction.name == "MAXIMIZE" else "minimize"
