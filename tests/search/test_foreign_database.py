"""Databases ragsweep did not write, or wrote otherwise: another program's file, plain Optuna
studies, attributes of the wrong kind. Every query command either answers as it would for what can
be read, or prints one ``error:`` line and exits 2 with nothing on stdout; the file never changes."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest

from search.store import GROUP_ATTR, SPEC_ATTR, STAGE_ATTR
from tests.cli import ragsweep as run_ragsweep
from tests.search.test_cli import assert_one_line_error
from tests.search.test_store import fill_launch

STUDY = "demo"  # what fill_launch writes: stages none, ft_embed, ft_gen, independent, two_phase
BEST = "none/1"  # the best trial on F1 (0.2, tied with each stage's trial 1, and first)
THEIRS = "théirs [/] study"  # a plain Optuna study; [/] is rich markup that has nothing to close

# Every query command as a user types it; {study} and {out} are filled in per case.
QUERIES: dict[str, tuple[str, ...]] = {
    "studies": ("studies",),
    "studies json": ("studies", "--format", "json"),
    "trials": ("trials", "{study}"),
    "trials json": ("trials", "{study}", "--format", "json"),
    "trials csv": ("trials", "{study}", "--format", "csv"),
    "best": ("best", "{study}"),
    "best json": ("best", "{study}", "--format", "json"),
    "pareto json": ("pareto", "{study}", "--format", "json"),
    "compare": ("compare", "{study}"),
    "export": ("export", "{study}", "-o", "{out}/trials.json"),
    "plot": ("plot", "{study}", "-o", "{out}/front.png"),
}
# The answers that must not change when a launch's database moves or its attributes are
# unreadable but recoverable (the table's title names the file, so tables are left out).
_SAME_ANSWERS = ("studies json", "trials json", "trials csv", "best json", "pareto json")


def ragsweep(*args: str) -> subprocess.CompletedProcess[str]:
    return run_ragsweep(*args, env={"COLUMNS": "200"})  # in this process (tests.cli)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"


def url(path: Path) -> str:
    return f"sqlite:///{path}"


# --- building the databases, with plain Optuna and sqlite3 ------------------------------------------


def _sql(path: Path, statement: str, *params: object) -> None:
    with closing(sqlite3.connect(path)) as db, db:
        changed = db.execute(statement, params).rowcount
    assert changed, statement  # the corruption took


def _trial_id(path: Path, trial: str) -> int:
    stage, _, number = trial.rpartition("/")
    with closing(sqlite3.connect(path)) as db:
        [(trial_id,)] = db.execute(
            "SELECT t.trial_id FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = ? AND t.number = ?",
            (f"{STUDY}/{stage}", int(number)),
        ).fetchall()
    return int(trial_id)


def _trial_attr(path: Path, trial: str, key: str, value_json: str) -> None:
    """Store ``value_json`` as the text of ``trial``'s user attribute ``key`` (Optuna refuses to
    change a finished trial)."""
    trial_id = _trial_id(path, trial)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "DELETE FROM trial_user_attributes WHERE trial_id = ? AND key = ?", (trial_id, key)
        )
        db.execute(
            "INSERT INTO trial_user_attributes (trial_id, key, value_json) VALUES (?, ?, ?)",
            (trial_id, key, value_json),
        )


def _launch_studies(path: Path) -> list[str]:
    return [s for s in optuna.get_all_study_names(url(path)) if s.startswith(f"{STUDY}/")]


def _text_file(path: Path) -> Path:
    path.write_text("stage,trial,f1\nft_gen,0,0.5\n")
    return path


def _empty_file(path: Path) -> Path:
    path.touch()
    return path


def _another_programs_sqlite(path: Path) -> Path:
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.execute("INSERT INTO notes (body) VALUES ('not a study')")
    return path


def _tables_of_another_schema(path: Path) -> Path:
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY, title TEXT)")
        db.execute("INSERT INTO studies (title) VALUES ('demo')")
    return path


def _a_folder(path: Path) -> Path:
    path.mkdir()
    return path


def _optuna_database_without_studies(path: Path) -> Path:
    optuna.storages.RDBStorage(url(path))
    return path


def _plain_optuna_study(path: Path) -> Path:
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("note", "theirs")
        return (
            trial.suggest_float("x", 0, 1)
            + trial.suggest_int("n", 1, 3)
            + 0.0 * len(str(trial.suggest_categorical("kind", ["a", "b"])))
        )

    study = optuna.create_study(storage=url(path), study_name=THEIRS)
    study.optimize(objective, n_trials=3)
    return path


def _group_not_text(path: Path) -> None:
    for name in _launch_studies(path):
        optuna.load_study(study_name=name, storage=url(path)).set_user_attr(GROUP_ATTR, 5)


def _stage_not_text(path: Path) -> None:
    study = optuna.load_study(study_name=f"{STUDY}/ft_gen", storage=url(path))
    study.set_user_attr(STAGE_ATTR, ["ft_gen"])


def _group_not_json(path: Path) -> None:
    _sql(path, f"UPDATE study_user_attributes SET value_json = '{{oops' WHERE key = '{GROUP_ATTR}'")


def _launch_attrs_not_json(path: Path) -> None:
    _sql(path, "UPDATE study_user_attributes SET value_json = '{oops'")


def _spec(value: object) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        storage = optuna.storages.RDBStorage(url(path))
        for name in _launch_studies(path):
            storage.set_study_system_attr(storage.get_study_id_from_name(name), SPEC_ATTR, value)

    return corrupt


def _spec_not_json(path: Path) -> None:
    _sql(path, 'UPDATE study_system_attributes SET value_json = \'{"name": "demo", \'')


def _copied_stage_study(path: Path) -> None:
    # optuna copy-study copies the user and system attributes: two studies hold stage ft_gen.
    optuna.copy_study(
        from_study_name=f"{STUDY}/ft_gen",
        from_storage=url(path),
        to_storage=url(path),
        to_study_name=f"{STUDY}/ft_gen copy",
    )


def _trial_attrs(trial: str, **values_json: str) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        for key, value_json in values_json.items():
            _trial_attr(path, trial, key, value_json)

    return corrupt


def _each(*corruptions: Callable[[Path], None]) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        for corruption in corruptions:
            corruption(path)

    return corrupt


def _param_distribution_not_json(path: Path) -> None:
    _sql(
        path,
        "UPDATE trial_params SET distribution_json = '{oops' WHERE trial_id = ?",
        _trial_id(path, "none/0"),
    )


def _time_not_a_time(path: Path) -> None:
    _sql(
        path,
        "UPDATE trials SET datetime_start = 'yesterday' WHERE trial_id = ?",
        _trial_id(path, BEST),
    )


def _moved(name: str) -> Callable[[Path], Path]:
    def move(path: Path) -> Path:
        target = path.parent / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return path.rename(target)

    return move


def _symlink(path: Path) -> Path:
    link = path.parent / "link to studies.db"
    link.symlink_to(path)
    return link


def _read_only(path: Path) -> Path:
    path.chmod(0o444)
    return path


# --- the cases ----------------------------------------------------------------------------------------

_ALL = "*"
_NOT_A_DATABASE = {_ALL: ("is not a study database", "--storage")}


@dataclass(frozen=True)
class Case:
    """A database and what each query gives: one ``error:`` line with ``refused[query]``'s
    fragments (``refused["*"]``: every query), else an answer."""

    build: Callable[[Path], Path | None]  # on a copy of the launch's file (None: that file)
    fresh: bool = False  # build from nothing at the path, not from the launch's copy
    study: str = STUDY
    refused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    same_answers: bool = False  # every answer as for the launch's own file
    check: Callable[[dict[str, subprocess.CompletedProcess[str]], Path], None] | None = None


def _json(results: dict[str, subprocess.CompletedProcess[str]], query: str) -> Any:
    return json.loads(results[query].stdout)


def _trials(results: dict[str, subprocess.CompletedProcess[str]]) -> dict[str, dict]:
    return {row["trial"]: row for row in _json(results, "trials json")}


def _best_without(trial: str, train_flops: float | None = None) -> Callable[..., None]:
    """The trial shows without F1 and is never best: the next of equals is."""

    def check(results: dict[str, subprocess.CompletedProcess[str]], out: Path) -> None:
        assert _json(results, "best json")["trial"] == "ft_embed/1"
        row = _trials(results)[trial]
        assert (row["f1"], row["em"], row["train_flops"]) == (None, None, train_flops)
        assert trial not in {row["trial"] for row in _json(results, "pareto json")}

    return check


def _theirs(results: dict[str, subprocess.CompletedProcess[str]], out: Path) -> None:
    trials = _trials(results)
    assert list(trials) == [f"{THEIRS}/{number}" for number in range(3)]
    assert {row["method"] for row in trials.values()} == {THEIRS}
    assert THEIRS in results["studies"].stdout and THEIRS in results["trials"].stdout
    exported = json.loads((out / "trials.json").read_text())
    assert [row["note"] for row in exported] == ["theirs"] * 3


def _stages_by_name(results: dict[str, subprocess.CompletedProcess[str]], out: Path) -> None:
    # Without the spec the stages come in name order; every trial is there.
    assert sorted(_trials(results)) == sorted(
        f"{stage}/{number}"
        for stage in ("none", "ft_embed", "ft_gen", "independent", "two_phase")
        for number in range(3)
    )
    assert _json(results, "best json")["trial"] == "ft_embed/1"


def _copy_shows(results: dict[str, subprocess.CompletedProcess[str]], out: Path) -> None:
    trials = _trials(results)
    assert {"ft_gen/0", "ft_gen/1", "ft_gen/2"} <= set(trials)
    assert {f"{STUDY}/ft_gen copy/{number}" for number in range(3)} <= set(trials)


def _methods(results: dict[str, subprocess.CompletedProcess[str]], out: Path) -> None:
    trials = _trials(results)
    assert (trials["none/0"]["method"], trials["none/1"]["method"]) == ("none", "magic")


def _failure_attrs(results: dict[str, subprocess.CompletedProcess[str]], out: Path) -> None:
    row = _trials(results)["none/2"]
    assert (row["state"], row["fail_reason"]) == ("fail", None)
    [exported] = [
        r for r in json.loads((out / "trials.json").read_text()) if r["trial"] == "none/2"
    ]
    assert not {"checkpoint", "retryable", "node", "fail_reason"} & set(exported)


def _rates(lr_generator: float | None, record: object = None) -> Callable[..., None]:
    def check(results: dict[str, subprocess.CompletedProcess[str]], out: Path) -> None:
        row = _trials(results)[BEST]
        assert (row["lr_embedder"], row["lr_generator"]) == (1e-4, lr_generator)
        best = _json(results, "best json")
        assert (best["trial"], best["metrics"]["f1"]) == (BEST, 0.2)
        if record is not None:
            assert best["record"] == record

    return check


def _no_start_time(results: dict[str, subprocess.CompletedProcess[str]], out: Path) -> None:
    assert _json(results, "best json")["started"] is None


def _foreign_text(results: dict[str, subprocess.CompletedProcess[str]], out: Path) -> None:
    assert _json(results, "best json")["theirs"] == "{oops"


_SPEC_REFUSED = {"compare": ("study 'demo'", "spec")}
_RECORD = '{"config": {"lr_embedder": 0.0001, "lr_generator": 0.0001, "reuse": {}}}'

CASES: dict[str, Case] = {
    # Not a study database at all: every query refuses it.
    "a text file": Case(_text_file, fresh=True, refused=_NOT_A_DATABASE),
    "an empty file": Case(_empty_file, fresh=True, refused=_NOT_A_DATABASE),
    "another program's sqlite file": Case(
        _another_programs_sqlite, fresh=True, refused=_NOT_A_DATABASE
    ),
    "tables of another schema": Case(
        _tables_of_another_schema, fresh=True, refused=_NOT_A_DATABASE
    ),
    "a folder": Case(_a_folder, fresh=True, refused={_ALL: ("is a folder", "--storage")}),
    # Optuna's databases ragsweep did not write.
    "optuna database without studies": Case(
        _optuna_database_without_studies,
        fresh=True,
        refused={
            query: ("no study 'demo'", "holds no study yet")
            for query in QUERIES
            if not query.startswith("studies")
        },
    ),
    "plain optuna study": Case(
        _plain_optuna_study,
        fresh=True,
        study=THEIRS,
        refused={
            "best": ("no completed trial with f1",),
            "best json": ("no completed trial with f1",),
            "plot": ("no completed trial with f1",),
        },
        check=_theirs,
    ),
    # Study attributes of the wrong kind.
    "group not text": Case(_group_not_text, same_answers=True),
    "stage not text": Case(_stage_not_text, same_answers=True),
    "group not json": Case(_group_not_json, same_answers=True),
    # Neither group nor stage: each stage study reads alone, by its full name.
    "launch attributes not json": Case(
        _launch_attrs_not_json,
        refused={
            query: ("no study 'demo'", "it holds: demo/ft_embed, demo/ft_gen")
            for query in QUERIES
            if not query.startswith("studies")
        },
    ),
    "spec not json": Case(_spec_not_json, refused=_SPEC_REFUSED, check=_stages_by_name),
    "spec not a mapping": Case(_spec(["none"]), refused=_SPEC_REFUSED, check=_stages_by_name),
    "spec fails validation": Case(
        _spec({"name": "demo", "methods": ["magic"]}),
        refused=_SPEC_REFUSED,
        check=_stages_by_name,
    ),
    "copied stage study": Case(_copied_stage_study, check=_copy_shows),
    # Trial attributes of the wrong kind.
    "metrics a string": Case(_trial_attrs(BEST, metrics='"0.2"'), check=_best_without(BEST)),
    "metrics a list": Case(_trial_attrs(BEST, metrics="[0.2, 0.4]"), check=_best_without(BEST)),
    "metrics not json": Case(_trial_attrs(BEST, metrics='{"f1": 0.2,'), check=_best_without(BEST)),
    "metric values not numbers": Case(
        _trial_attrs(
            BEST,
            metrics='{"f1": "0.2", "em": null, "recall_at_k": true, "wall_s": NaN, "train_flops": 1e12}',
        ),
        check=_best_without(BEST, train_flops=1e12),
    ),
    "method not a name": Case(
        _each(_trial_attrs("none/0", method="7"), _trial_attrs(BEST, method='"magic"')),
        check=_methods,
    ),
    "failure attributes not typed": Case(
        _trial_attrs(
            "none/2", fail_reason='{"why": 1}', retryable='"no"', checkpoint="5", node="[1]"
        ),
        check=_failure_attrs,
    ),
    "record without config": Case(
        _trial_attrs(BEST, record='{"seed": 1}'), check=_rates(None, {"seed": 1})
    ),
    "record config not a trial config": Case(
        _trial_attrs(
            BEST,
            record='{"config": {"lr_embedder": "fast", "lr_generator": "slow", "reuse": ["x"]}}',
        ),
        check=_rates(None),
    ),
    "record not an object": Case(
        _trial_attrs(BEST, record='"a record"'), check=_rates(None, "a record")
    ),
    "record not json": Case(
        _trial_attrs(BEST, record=_RECORD[:-3]), check=_rates(None, _RECORD[:-3])
    ),
    "record parts of the wrong kind": Case(
        _trial_attrs(
            BEST,
            record=_RECORD[:-1] + ', "environment": [1], "phases": 5, "reused_phases": "ft_gen", '
            '"final_losses": "x", "has_context_labels": "no", "seed": "s"}',
        ),
        check=_rates(1e-4),
    ),
    "param distribution not json": Case(_param_distribution_not_json, same_answers=True),
    "time not a time": Case(_time_not_a_time, check=_no_start_time),
    "foreign attribute not json": Case(_trial_attrs(BEST, theirs="{oops"), check=_foreign_text),
    # The launch's own file, found another way.
    "path with spaces and unicode": Case(_moved("my studies/étude ü.db"), same_answers=True),
    "symlink": Case(_symlink, same_answers=True),
    "read-only file": Case(_read_only, same_answers=True),
}


# --- the tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("launch") / "studies.db"
    fill_launch(url(path), STUDY)
    return path


@pytest.fixture(scope="module")
def launch_answers(launch_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("answers")
    return {query: ask(launch_file, query, STUDY, out).stdout for query in _SAME_ANSWERS}


def ask(path: Path, query: str, study: str, out: Path) -> subprocess.CompletedProcess[str]:
    args = [arg.format(study=study, out=out) for arg in QUERIES[query]]
    return ragsweep(*args, "--storage", url(path))


def build(case: Case, launch_file: Path, tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "studies.db"
    if not case.fresh:
        shutil.copyfile(launch_file, path)
    built = case.build(path)
    return built if isinstance(built, Path) else path


@pytest.mark.parametrize("name", list(CASES))
def test_every_query_answers_or_refuses_in_one_line_and_changes_nothing(
    name: str, launch_file: Path, launch_answers: dict[str, str], tmp_path: Path
) -> None:
    case = CASES[name]
    path = build(case, launch_file, tmp_path / "db")
    before = sha256(path)
    out = tmp_path / "out"
    results = {}
    for query in QUERIES:
        result = ask(path, query, case.study, out)
        fragments = case.refused.get(query, case.refused.get(_ALL))
        if fragments is not None:
            assert_one_line_error(result, *fragments)
            assert result.stdout == "", (query, result.stdout)
        else:
            assert result.returncode == 0, (query, result.stderr)
            assert result.stderr == "", (query, result.stderr)
            assert result.stdout.strip(), query
        results[query] = result
    wrote = {p.name for p in out.iterdir()} if out.exists() else set()
    assert wrote == {
        "trials.json" if query == "export" else "front.png"
        for query in ("export", "plot")
        if query not in case.refused and _ALL not in case.refused
    }
    assert sha256(path) == before
    if case.same_answers:
        assert {query: results[query].stdout for query in _SAME_ANSWERS} == launch_answers
    if case.check is not None:
        case.check(results, out)


_VALID_CONFIG = '{"method": "ft_gen", "lr_generator": 0.0001}'


@pytest.mark.parametrize(
    ("record", "fragments"),
    [
        (None, ("has no stored record",)),
        ('"a record"', ("stored record is not a JSON object",)),
        ('{"config": {"method": "ft_gen"', ("stored record is not a JSON object",)),
        ('{"seed": 1}', ("record holds no config",)),
        ('{"config": [1]}', ("record holds no config",)),
        ('{"config": {"method": "magic"}}', ("stored config is not a trial config", "method")),
        (f'{{"config": {_VALID_CONFIG}}}', ("no data fingerprint",)),
    ],
    ids=[
        "no record",
        "not an object",
        "not json",
        "no config",
        "config not an object",
        "config invalid",
        "no fingerprint",
    ],
)
def test_reproduce_refuses_a_record_it_cannot_rerun_before_training(
    record: str | None, fragments: tuple[str, ...], launch_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "studies.db"
    shutil.copyfile(launch_file, path)
    if record is None:
        _sql(path, "DELETE FROM trial_user_attributes WHERE key = 'record'")
    else:
        _trial_attr(path, BEST, "record", record)
    before = sha256(path)
    result = ragsweep("reproduce", STUDY, "--trial", BEST, "--storage", url(path))
    assert_one_line_error(result, BEST, *fragments)
    assert result.stdout == ""
    assert sha256(path) == before


@pytest.mark.parametrize(
    "name", ["a text file", "an empty file", "another program's sqlite file", "a folder"]
)
def test_dashboard_refuses_what_is_not_a_study_database(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    path = build(case, tmp_path / "unused.db", tmp_path)
    before = sha256(path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Were it to serve the file, the timeout would stop it and fail the test.
    result = subprocess.run(
        [sys.executable, "-c", "from search.cli import main; main()", "dashboard"]
        + ["--storage", url(path), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(result, *case.refused[_ALL])
    assert result.stdout == ""
    assert sha256(path) == before
