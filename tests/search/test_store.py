"""The trial record: one writer, one reader (per trial, and in bulk for the queries, which must
agree), the stored attribute keys old databases hold, and the one best-trial rule; on SQLite and
PostgreSQL."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import optuna
import pytest

from search.spec import load_spec
from search.store import (
    TrialOutcome,
    TrialRecord,
    best_trial,
    decode_questions,
    encode_questions,
    finished_params,
    open_database,
    open_stage_study,
    open_storage,
    read_trial,
    read_trials,
    record_trial,
    trial_attrs,
)
from tests.storage import storage_url_for
from trainers import QuestionResult, questions_json

DEMO = Path(__file__).resolve().parents[2] / "studies" / "demo.yaml"
_RATE = optuna.distributions.FloatDistribution(1e-8, 1e-3, log=True)


def fill_launch(url: str, name: str, trials_per_stage: int = 3) -> None:
    """Stage studies of studies/demo.yaml as a launch writes them, with completed trials (the last
    of each stage failed, retryable) whose records carry the config the queries read."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(DEMO, {"name": name})
    storage = open_storage(url)
    for stage in ("none", "ft_embed", "ft_gen", "independent", "two_phase"):
        study = open_stage_study(storage, spec, stage)
        trials = []
        for number in range(trials_per_stage):
            rates = {"lr_embedder": 10.0 ** -(3 + number), "lr_generator": 1e-4}
            failed = number == trials_per_stage - 1
            outcome = TrialOutcome(
                metrics={"em": 0.1 * number, "f1": 0.2 * number, "train_flops": 1e12 * number},
                method=stage,
                stage=stage,
                record={"config": {**rates, "reuse": {}}, "has_context_labels": True},
                fail_reason="diverged" if failed else None,
                retryable=False if failed else None,
                node="n" * 8,
            )
            trials.append(
                optuna.trial.create_trial(
                    state=optuna.trial.TrialState.FAIL
                    if failed
                    else optuna.trial.TrialState.COMPLETE,
                    params={"lr_embedder": rates["lr_embedder"]},
                    distributions={"lr_embedder": _RATE},
                    values=None if failed else [0.2 * number],
                    user_attrs=trial_attrs(outcome),
                )
            )
        study.add_trials(trials)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    return storage_url_for(request.param, tmp_path)


def test_bulk_read_gives_what_optuna_reads_for_every_kind_of_trial(storage_url):
    name = f"store-{uuid.uuid4().hex[:8]}"
    fill_launch(storage_url, name)
    storage = open_storage(storage_url)
    study = optuna.load_study(study_name=f"{name}/ft_gen", storage=storage)
    running = study.ask(
        {"lr_generator": _RATE, "batch": optuna.distributions.CategoricalDistribution(["a", "b"])}
    )
    running.set_user_attr("someone_elses", {"nested": [1, 2]})
    study.enqueue_trial({"lr_generator": 1e-5})  # WAITING (ask would have taken it)
    database = open_database(storage_url)
    studies = [s for s in database.studies() if s.group == name]
    assert {s.stage for s in studies} == {"none", "ft_embed", "ft_gen", "independent", "two_phase"}

    bulk = database.trials(studies)
    one_by_one = [
        read_trial(s.stage, trial)
        for s in studies
        for trial in optuna.load_study(study_name=s.name, storage=storage).trials
    ]
    assert [t.id for t in bulk] == [t.id for t in one_by_one]
    for fast, slow in zip(bulk, one_by_one, strict=True):
        assert fast == slow  # every field but the lazily decoded record
        assert fast.record == slow.record and fast.attributes() == slow.attributes()
        assert (fast.lr_embedder, fast.lr_generator) == (slow.lr_embedder, slow.lr_generator)
    states = {t.state for t in bulk}
    assert states == {"COMPLETE", "FAIL", "RUNNING", "WAITING"}
    [asked] = [t for t in bulk if t.state == "RUNNING"]
    assert asked.params["batch"] in ("a", "b")  # a categorical parameter in its own value
    assert asked.other_attrs == {"someone_elses": {"nested": [1, 2]}}
    assert (
        asked.started is not None
        and asked.started == next(t for t in one_by_one if t.state == "RUNNING").started
    )


def test_trials_are_stored_under_the_keys_old_databases_hold(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    written = {
        "metrics": {"f1": 0.5},
        "method": "ft_gen",
        "stage": "ft_gen",
        "record": {"config": {"lr_generator": 1e-4}},
        "checkpoint": "/runs/x",
        "node": "abc",
    }
    outcome = TrialOutcome(**written, fail_reason=None)  # no value: not stored
    assert TrialOutcome.from_json(outcome.to_json()) == outcome  # as a worker sends it
    record_trial(trial, outcome)
    study.tell(trial, [0.5])
    stored = study.trials[0].user_attrs
    assert stored == written
    # Read back from the attributes as an older ragsweep wrote them.
    record = read_trial("s", study.trials[0])
    assert (record.metrics, record.method, record.checkpoint, record.node) == (
        {"f1": 0.5},
        "ft_gen",
        "/runs/x",
        "abc",
    )
    assert record.lr_generator == 1e-4 and record.fail_reason is None and record.retryable is None
    assert read_trials(study)[0] == record


def test_a_study_ragsweep_did_not_write_reads_with_its_name_as_stage(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}")
    study = optuna.create_study(storage=storage, study_name="theirs")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    database = open_database(f"sqlite:///{tmp_path / 'studies.db'}")
    [stored] = database.studies()
    assert (stored.group, stored.stage, stored.spec) == ("theirs", "theirs", None)
    records = database.trials([stored])
    assert [(r.id, r.method, r.metrics, r.record) for r in records] == [
        ("theirs/0", "theirs", {}, {}),
        ("theirs/1", "theirs", {}, {}),
    ]


def _trial(number: int, state: str = "COMPLETE", **metrics: float) -> TrialRecord:
    return TrialRecord(
        stage="stage",
        number=number,
        state=state,
        params={},
        started=None,
        completed=None,
        method="ft_gen",
        metrics=metrics,
        checkpoint=None,
        fail_reason=None,
        retryable=None,
        node=None,
        pruned_at={"rung": 1} if state == "PRUNED" else None,
        per_question=None,
        other_attrs={},
        _record=None,
    )


def test_best_trial_is_the_highest_completed_and_the_earliest_of_equals():
    trials = [
        _trial(0, f1=0.5),
        _trial(1, "FAIL", f1=0.9),
        _trial(5, "PRUNED", f1=0.95),  # stopped early: never best, whatever it holds
        _trial(2, f1=0.7),
        _trial(3, f1=0.7),
        _trial(4, em=1.0),
    ]
    assert best_trial(trials, "f1").number == 2  # type: ignore[union-attr]
    assert best_trial(trials, "f1", maximize=False).number == 0  # type: ignore[union-attr]
    assert best_trial(trials, "em").number == 4  # type: ignore[union-attr]
    assert best_trial(trials, "recall_at_k") is None


def test_relaunch_skips_completed_and_recurring_failures_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    fill_launch(url, "demo", trials_per_stage=2)
    storage = open_storage(url)
    study = optuna.load_study(study_name="demo/ft_embed", storage=storage)
    dead = study.ask({"lr_embedder": _RATE})
    record_trial(dead, TrialOutcome(fail_reason="worker died", retryable=True))
    study.tell(dead, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({"lr_embedder": 1e-5})
    stopped = study.ask({"lr_embedder": _RATE})
    record_trial(stopped, TrialOutcome(pruned_at={"rung": 1, "answer_logprob": -3.0}))
    study.tell(stopped, state=optuna.trial.TrialState.PRUNED)
    # A trial early stopping stopped is finished: a relaunch does not run it again.
    assert finished_params(study) == [
        {"lr_embedder": 1e-3},
        {"lr_embedder": 1e-4},
        {"lr_embedder": 1e-5},
    ]


def test_a_stage_with_only_stopped_trials_runs_them_again(tmp_path):
    """Stopped trials are finished while the stage has a completed one to build on; without
    one (the trial that went on failed after its last rung) a relaunch runs them again."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="only-stopped", storage=storage)
    for rate, state in ((1e-3, "FAIL"), (1e-4, "PRUNED")):
        study.enqueue_trial({"lr_embedder": rate})
        trial = study.ask({"lr_embedder": _RATE})
        if state == "FAIL":
            record_trial(trial, TrialOutcome(fail_reason="diverged", retryable=False))
        else:
            record_trial(trial, TrialOutcome(pruned_at={"rung": 1, "answer_logprob": -3.0}))
        study.tell(trial, state=optuna.trial.TrialState[state])
    assert finished_params(study) == [{"lr_embedder": 1e-3}]  # the stopped point runs again
    study.enqueue_trial({"lr_embedder": 1e-5})
    done = study.ask({"lr_embedder": _RATE})
    study.tell(done, 0.5)
    assert finished_params(study) == [
        {"lr_embedder": 1e-3},
        {"lr_embedder": 1e-4},
        {"lr_embedder": 1e-5},
    ]


def _open_fresh(url: str) -> str:
    open_storage(url)
    return "opened"


def test_launches_creating_one_new_sqlite_database_at_once_all_open_it(tmp_path):
    """Processes that create the same new database race to create Optuna's tables; each must
    end with the storage open, never 'table studies already exists'."""
    from concurrent.futures import ProcessPoolExecutor

    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'race-{attempt}.db'}"
        with ProcessPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(_open_fresh, [url] * 4))
        assert results == ["opened"] * 4


def _answered(count: int) -> list[QuestionResult]:
    return [
        QuestionResult(
            id=f"q{i}",
            prediction=f"answer {i}",
            em=float(i % 2),
            f1=0.5 * (i % 3),
            recall=None if i == 0 else 1.0 / i,
            retrieved=(f"d{i}", f"d{i + 1}"),
        )
        for i in range(count)
    ]


def test_per_question_results_are_one_compact_attribute_read_back_as_written(storage_url):
    """A trial's per-question results: one attribute (gzip + base64) on every backend, read
    back field for field, and refused when they do not match the hash the record keeps."""
    answered = _answered(300)
    canonical = questions_json(answered)
    study = optuna.create_study(storage=open_storage(storage_url), study_name=f"q-{uuid.uuid4()}")
    for tampered in (False, True):
        encoded = encode_questions(answered)
        sha256 = hashlib.sha256(canonical.encode()).hexdigest()
        trial = study.ask()
        record_trial(
            trial,
            TrialOutcome(
                metrics={"f1": 0.5},
                record={"questions_sha256": "0" * 64 if tampered else sha256},
                per_question=encoded,
            ),
        )
        study.tell(trial, 0.5)
        assert len(encoded) < len(canonical) / 3  # compressed
    honest, tampered_with = read_trials(study)
    assert honest.questions == tuple(answered)
    assert tampered_with.questions is None
    assert "per_question" in honest.attributes()
    assert decode_questions("not base64 at all!", None) is None
