"""A study of the embedder that scores retrieval alone (``training.evaluate: retrieval``), launched
on a real local Ray and SQLite, then read by the query commands as a user would."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
import yaml

from search.forecast import trial_seconds
from search.launch.dispatch import launch
from search.plan import make_plan
from search.spec import load_spec
from search.store import open_storage, read_trials
from tests.cli import ragsweep
from tests.held_out import assert_leaders_scored_test
from tests.tiny import TINY_DATA, TINY_SPEC

RETRIEVAL_STUDY = TINY_SPEC | {
    "name": "retrieval",
    "methods": ["none", "ft_embed"],
    "data": TINY_SPEC["data"] | {"n_test": 6},
    "training": TINY_SPEC["training"] | {"evaluate": "retrieval"},
    "search": {"lr_embedder": [1e-4, 1e-3], "early_stopping": True},
    "objectives": [{"metric": "recall_at_k", "direction": "maximize"}],
    "concurrency": 2,
}


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("retrieval")
    path = folder / "retrieval.yaml"
    path.write_text(yaml.safe_dump(RETRIEVAL_STUDY))
    url = f"sqlite:///{folder / 'retrieval.db'}"
    launch(load_spec(path), storage_url=url, runs_dir=folder / "runs", cache_dir=cache_dir)
    return url, folder


def test_every_trial_reports_recall_and_no_answer_scores(study):
    url, _ = study
    storage = open_storage(url)
    studies = [
        optuna.load_study(study_name=f"retrieval/{stage}", storage=storage)
        for stage in ("none", "ft_embed")
    ]
    assert [len(stage.trials) for stage in studies] == [1, 2]
    for stage in studies:
        for trial in stage.trials:
            assert trial.state == optuna.trial.TrialState.COMPLETE
            metrics = trial.user_attrs["metrics"]
            assert trial.value == metrics["recall_at_k"]
            assert 0 <= metrics.get("test_recall_at_k", 0) <= 1
            assert not {"em", "f1", "test_em", "test_f1"} & set(metrics)
        # The held-out split: scored by the trials that led their stage as they finished.
        assert_leaders_scored_test(read_trials(stage), "recall_at_k")


def test_queries_rank_by_recall_and_show_its_intervals(study):
    url, folder = study
    trials = json.loads(
        ragsweep("trials", "retrieval", "--storage", url, "--format", "json").stdout
    )
    best_recall = max(trial["recall_at_k"] for trial in trials)
    # studies lists it by its objective: its F1 was never scored.
    (listed,) = json.loads(ragsweep("studies", "--storage", url, "--format", "json").stdout)
    assert (listed["objective"], listed["best"]) == ("recall_at_k", best_recall)
    # best ranks by the study's objective when no --metric is given: F1 was never scored.
    best = ragsweep("best", "retrieval", "--storage", url, "--format", "json")
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["metrics"]["recall_at_k"] == best_recall
    compared = ragsweep("compare", "retrieval", "--storage", url, "--format", "json")
    assert compared.returncode == 0, compared.stderr
    rows = {row["method"]: row for row in json.loads(compared.stdout)}
    assert set(rows) == {"none", "ft_embed"}
    for row in rows.values():
        low, high = row["recall_at_k_95"]
        assert low <= row["recall_at_k"] <= high
        assert row["em"] is None and row["f1"] is None
    exported = folder / "questions.csv"
    assert (
        ragsweep(
            "export", "retrieval", "--storage", url, "--per-question", "-o", str(exported)
        ).returncode
        == 0
    )
    with exported.open() as file:
        answers = list(csv.DictReader(file))
    assert len(answers) == 3 * TINY_DATA.n_validation
    assert {row["prediction"] for row in answers} == {""}  # nothing generated
    assert all(row["retrieved"] for row in answers)


def test_plan_forecasts_evaluation_without_generation(tmp_path):
    answers = tmp_path / "answers.yaml"
    retrieval = tmp_path / "retrieval.yaml"
    answers_spec = RETRIEVAL_STUDY | {
        "training": TINY_SPEC["training"],
        "objectives": [{"metric": "f1", "direction": "maximize"}],
    }
    # The forecast knows real models' shapes only: the demo's, at PopQA-like sizes.
    for path, spec in ((answers, answers_spec), (retrieval, RETRIEVAL_STUDY)):
        real = spec | {"models": {"embedder": "minilm", "generator": "smollm2-135m"}}
        real["data"] = real["data"] | {"n_validation": 300, "n_test": 300}
        path.write_text(yaml.safe_dump(real))
    seconds = {}
    for path in (answers, retrieval):
        spec = load_spec(path)
        stage = next(s for s in make_plan(spec, forecast=False).stages if s.method == "none")
        seconds[path.stem] = trial_seconds(stage, spec)
    # What is left is mostly the fixed cost of a trial (loading the models, the index).
    assert seconds["retrieval"] < seconds["answers"] / 5
