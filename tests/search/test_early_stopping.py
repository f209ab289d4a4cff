"""Early stopping end to end on the tiny models: trials report a signal at rungs, the stage's
pruner stops those that trail, and a stopped trial is stored PRUNED with its rung and its real
cost, is never a stage's best (nor what later stages build on), and is never run again.
The pruning rule on its own, on a real Optuna study."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import optuna
import pytest
import yaml

from search.launch._optuna_search import _run_order
from search.launch._pruning import RungPruner, signal_attr
from search.launch.dispatch import launch
from search.spec import StudySpec, load_spec
from search.store import open_storage, read_trials
from tests.held_out import assert_leaders_scored_test
from tests.search.test_cli import assert_one_line_error, ragsweep
from tests.tiny import TINY_SPEC

# 3e-3 trains; the others cannot move the model, so at each rung they trail 3e-3's signal: at
# the first by less than the signal's resolution (0.05 nats) plus its noise, at the second by more.
# Listed rising: with early stopping a stage runs a LoRA generator's grid from the largest rate down.
RATES = [1e-30, 2e-30, 3e-30, 3e-3]


@pytest.fixture(scope="module")
def pruned_study(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("early-stopping")
    fields = {
        "name": "early",
        "methods": ["ft_gen", "two_phase"],
        # A held-out test split: completed trials are scored on it, stopped ones never.
        "data": TINY_SPEC["data"] | {"n_test": 4},
        # ft_gen is then two_phase's phase 1: two_phase builds on ft_gen's best trial.
        "training": TINY_SPEC["training"] | {"ft_gen_objective": "rag_token"},
        "search": {
            "lr_generator": RATES,
            "lr_embedder": [1e-3],
            "early_stopping": True,
        },
        "concurrency": 1,  # one at a time: each trial meets the others' signals at its rungs
    }
    spec = _spec(folder, fields)
    url = f"sqlite:///{folder / 'studies.db'}"
    summary = launch(spec, storage_url=url, runs_dir=folder / "runs", cache_dir=cache_dir)
    return spec, url, folder, summary


@pytest.mark.slow
@pytest.mark.xdist_group("early_stopping")
def test_trailing_trials_are_stored_pruned_with_their_rung_and_cost(pruned_study):
    spec, url, _, summary = pruned_study
    assert summary.failed == {"ft_gen": 0, "two_phase": 0}
    assert summary.pruned == {"ft_gen": 2, "two_phase": 0}
    trials = read_trials(optuna.load_study(study_name="early/ft_gen", storage=open_storage(url)))
    states = {trial.lr_generator: trial.state for trial in trials}
    assert states == {3e-3: "COMPLETE", 1e-30: "COMPLETE", 2e-30: "PRUNED", 3e-30: "PRUNED"}
    # Run from 3e-3 down: 3e-30 and 2e-30 trail 3e-3 at the second rung (half of the 4 steps of
    # their phase; while fewer than 4 have reported, only the best goes on) beyond noise and
    # resolution. 1e-30 ties with the two stopped there, so it is in the best half of four.
    stopped_at = {t.lr_generator: t.pruned_at for t in trials if t.state == "PRUNED"}
    assert {rate: (at["rung"], at["step"]) for rate, at in stopped_at.items()} == {
        3e-30: (2, 2),
        2e-30: (2, 2),
    }
    assert [t.lr_generator for t in sorted(trials, key=lambda t: t.number)] == sorted(
        RATES, reverse=True
    )
    for trial in trials:
        if trial.state != "PRUNED":
            continue
        assert trial.pruned_at["steps"] == 4 and trial.pruned_at["phase"] == "generator"
        # Its real cost up to there, and no quality figure (it was never evaluated).
        assert trial.metrics["train_device_s"] > 0 and trial.metrics["train_flops"] > 0
        assert "f1" not in trial.metrics and "eval.device_s" not in trial.metrics
        assert trial.checkpoint is None
        assert trial.config["lr_generator"] == trial.lr_generator  # its config is stored
        assert trial.questions is None and "test_f1" not in trial.metrics  # never evaluated
    # The completed trial's per-question results are stored with it and add up to its F1.
    (complete,) = (trial for trial in trials if trial.lr_generator == 3e-3)
    assert complete.questions is not None and len(complete.questions) == spec.data.n_validation
    assert sum(q.f1 for q in complete.questions) / len(complete.questions) == pytest.approx(
        complete.metrics["f1"]
    )
    assert 0 <= complete.metrics["test_f1"] <= 1 and complete.metrics["test.device_s"] > 0
    assert len(complete.record["split"]["test_ids"]) == 4
    # 3e-3 ran first; 1e-30, which cannot train, finished after it and skipped the test split
    # unless it tied.
    assert_leaders_scored_test(trials, "f1", one_at_a_time=True)


@pytest.mark.slow
@pytest.mark.xdist_group("early_stopping")
def test_rung_values_are_optunas_intermediate_values(pruned_study):
    _, url, _, _ = pruned_study
    study = optuna.load_study(study_name="early/ft_gen", storage=open_storage(url))
    by_rate = {trial.params["lr_generator"]: trial for trial in study.get_trials()}
    complete = by_rate[3e-3]
    assert sorted(complete.intermediate_values) == [1, 2]  # steps 1 and 2 of 4
    untrained = by_rate[1e-30].intermediate_values[1]
    assert complete.intermediate_values[1] > untrained
    assert sorted(by_rate[2e-30].intermediate_values) == [1, 2]  # stopped at the second
    # The rates that cannot train all score the untrained pipeline at their rung.
    assert by_rate[2e-30].intermediate_values[1] == pytest.approx(untrained, abs=1e-6)
    rungs = complete.user_attrs["record"]["rungs"]
    assert [(rung["rung"], rung["step"]) for rung in rungs] == [(1, 1), (2, 2)]


@pytest.mark.slow
@pytest.mark.xdist_group("early_stopping")
def test_later_stages_build_on_the_completed_trial_and_a_relaunch_runs_nothing(
    pruned_study, cache_dir
):
    spec, url, folder, _ = pruned_study
    two_phase = read_trials(
        optuna.load_study(study_name="early/two_phase", storage=open_storage(url))
    )
    assert [trial.state for trial in two_phase] == ["COMPLETE"]
    assert two_phase[0].lr_generator == 3e-3  # ft_gen's completed trial, not a pruned one
    # A stage of one trial has nothing to stop it against: it takes no signals.
    assert "rungs" not in two_phase[0].record
    again = launch(spec, storage_url=url, runs_dir=folder / "runs", cache_dir=cache_dir)
    assert sum(again.ran.values()) == 0


@pytest.mark.slow
@pytest.mark.xdist_group("early_stopping")
def test_trials_shows_where_pruned_trials_stopped(pruned_study, cache_dir):
    _, url, _, _ = pruned_study
    listed = ragsweep(
        "trials",
        "early",
        "--storage",
        url,
        "--state",
        "pruned",
        "--format",
        "json",
        cache_dir=cache_dir,
    )
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 2 and {row["state"] for row in rows} == {"pruned"}
    # Markdown: one row per line, whatever the terminal's width.
    table = ragsweep(
        "trials", "early", "--storage", url, "--format", "markdown", cache_dir=cache_dir
    )
    assert table.returncode == 0, table.stderr
    assert sum("rung 2: generator step 2/4" in line for line in table.stdout.splitlines()) == 2


@pytest.mark.slow
@pytest.mark.xdist_group("early_stopping")
def test_compare_gives_each_chosen_runs_held_out_test_score(pruned_study, cache_dir):
    _, url, _, _ = pruned_study
    trials = read_trials(optuna.load_study(study_name="early/ft_gen", storage=open_storage(url)))
    (chosen,) = (trial for trial in trials if trial.lr_generator == 3e-3)
    compared = ragsweep("compare", "early", "--storage", url, cache_dir=cache_dir)
    assert compared.returncode == 0, compared.stderr
    flat = " ".join(compared.stdout.split())
    assert "held-out test f1 of each chosen run" in flat
    assert f"ft_gen {chosen.metrics['test_f1']:.3f}" in flat


@pytest.mark.slow
@pytest.mark.xdist_group("early_stopping")
def test_reproduce_refuses_a_pruned_trial_in_one_line(pruned_study, cache_dir):
    _, url, _, _ = pruned_study
    trials = read_trials(optuna.load_study(study_name="early/ft_gen", storage=open_storage(url)))
    pruned = next(trial for trial in trials if trial.state == "PRUNED")
    result = ragsweep(
        "reproduce", "early", "--trial", pruned.id, "--storage", url, cache_dir=cache_dir
    )
    assert_one_line_error(result, "was stopped early (rung", "reproduce a completed trial")


def test_the_pruner_keeps_the_best_share_of_each_rung():
    """Successive halving (reduction factor 2) at every reported rung, trials arriving in turn."""
    study = optuna.create_study(direction="maximize", pruner=RungPruner(2))
    decisions = []
    for value in [0.5, 0.9, 0.1, 0.7, 0.8]:
        trial = study.ask()
        trial.report(value, step=1)
        decisions.append(trial.should_prune())
        if decisions[-1]:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    # 0.5 alone goes on; 0.9 is the best of two; 0.1 is not the best of three (while fewer than
    # 4 have reported, only the best goes on); 0.7 is in the best 2 of 4; 0.8 in the best 2 of 5.
    assert decisions == [False, False, True, False, False]


def test_the_pruner_does_not_measure_against_a_trial_that_failed():
    """A rate that looked best early and then diverged is no standard for the others."""
    study = optuna.create_study(direction="maximize", pruner=RungPruner(2))
    diverged = study.ask()
    diverged.report(-2.0, step=1)
    study.tell(diverged, state=optuna.trial.TrialState.FAIL)
    trial = study.ask()
    trial.report(-3.0, step=1)
    assert not trial.should_prune()


def _report(study: optuna.Study, per_question: dict[str, float], resolution: float = 0.0) -> bool:
    """A new trial's rung-1 signal: whether it is stopped."""
    return _signal(study.ask(), 1, per_question, resolution)


def _signal(
    trial: optuna.Trial, rung: int, per_question: dict[str, float], resolution: float = 0.0
) -> bool:
    """The trial's signal at ``rung``, per question and its mean, as a launch stores it: whether
    it is stopped."""
    trial.set_user_attr(signal_attr(rung), {"resolution": resolution, "per_question": per_question})
    trial.report(statistics.fmean(per_question.values()), step=rung)
    return trial.should_prune()


def _shifted(per_question: dict[str, float], by: float) -> dict[str, float]:
    return {question: value + by for question, value in per_question.items()}


SIGNAL = {"q1": -1.0, "q2": -2.0, "q3": -0.8, "q4": -1.5}


def test_a_trial_first_at_a_rung_is_judged_at_the_last_rung_it_shares():
    """Trials started together run in step: the trailing one reaches each rung a moment before
    the better one. At its second rung, alone there, it is judged at the first, which the better
    trial has reached since, and stops."""
    study = optuna.create_study(direction="maximize", pruner=RungPruner(2, noise_z=2.0))
    trailing, better = study.ask(), study.ask()
    assert not _signal(trailing, 1, _shifted(SIGNAL, -1.0))  # alone at rung 1
    assert not _signal(better, 1, SIGNAL)
    assert _signal(trailing, 2, _shifted(SIGNAL, -0.5))


def test_a_trial_that_overtakes_is_judged_where_it_caught_up():
    """Behind at the first rung (first there, so not stopped) and ahead at the second: the
    second rung, which both reached, decides."""
    study = optuna.create_study(direction="maximize", pruner=RungPruner(2, noise_z=2.0))
    slow_starter, early_leader = study.ask(), study.ask()
    assert not _signal(slow_starter, 1, _shifted(SIGNAL, -1.0))
    assert not _signal(early_leader, 1, SIGNAL)
    assert not _signal(early_leader, 2, _shifted(SIGNAL, 0.2))
    assert not _signal(slow_starter, 2, _shifted(SIGNAL, 0.5))
    assert _signal(early_leader, 3, _shifted(SIGNAL, 0.2))  # alone at 3, behind at 2 beyond noise


@pytest.mark.parametrize(
    ("trailing", "stopped"),
    [
        # Behind on every question by about 0.1: a gap far beyond its noise.
        ({"q1": -1.1, "q2": -2.12, "q3": -0.9, "q4": -1.58}, True),
        # Behind by 0.075 on average, ahead on two questions: noise, it goes on.
        ({"q1": -0.5, "q2": -2.6, "q3": -0.3, "q4": -2.2}, False),
        # Exactly level on every question but one, where it trails a little: still noise.
        ({"q1": -1.0, "q2": -2.0, "q3": -0.8, "q4": -1.6}, False),
    ],
)
def test_the_pruner_stops_only_a_trial_that_trails_beyond_its_paired_noise(trailing, stopped):
    """Both trailing trials would stop under halving alone (the second of two); with a noise
    test at 2 standard errors only a gap larger than the per-question differences' noise does."""
    study = optuna.create_study(direction="maximize", pruner=RungPruner(2, noise_z=2.0))
    best = {"q1": -1.0, "q2": -2.0, "q3": -0.8, "q4": -1.5}
    assert not _report(study, best)
    assert statistics.fmean(trailing.values()) < statistics.fmean(best.values())
    assert _report(study, trailing) is stopped


def test_a_gap_beyond_noise_but_within_the_signals_resolution_does_not_stop_a_trial():
    """Behind on every question by 0.002 (far beyond its noise, which is nil): with a
    resolution of 0.01 the gap does not matter, with 0.001 it does."""
    best = {f"q{i}": 0.5 + i / 100 for i in range(8)}
    behind = {question: value - 0.002 for question, value in best.items()}
    for resolution, stopped in ((0.01, False), (0.001, True)):
        study = optuna.create_study(direction="maximize", pruner=RungPruner(2, noise_z=2.0))
        assert not _report(study, best, resolution)
        assert _report(study, behind, resolution) is stopped


def test_without_a_noise_test_or_values_to_pair_halving_alone_decides():
    level_but_one = {"q1": -1.0, "q2": -2.0, "q3": -0.8, "q4": -1.6}
    best = {"q1": -1.0, "q2": -2.0, "q3": -0.8, "q4": -1.5}
    plain = optuna.create_study(direction="maximize", pruner=RungPruner(2, noise_z=0.0))
    assert not _report(plain, best)
    assert _report(plain, level_but_one)
    unpaired = optuna.create_study(direction="maximize", pruner=RungPruner(2, noise_z=2.0))
    assert not _report(unpaired, best)
    assert _report(unpaired, {f"other {q}": v for q, v in level_but_one.items()})


def test_the_pruner_stops_a_signal_that_is_not_a_number():
    study = optuna.create_study(direction="maximize", pruner=RungPruner(2))
    trial = study.ask()
    trial.report(float("nan"), step=1)
    assert trial.should_prune()


def _spec(folder: Path, fields: dict) -> StudySpec:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(TINY_SPEC | fields))
    return load_spec(path)


@pytest.mark.parametrize(
    ("finetune", "generator_first"), [("lora", 1e-3), ("full", 1e-5)], ids=["lora", "full"]
)
def test_a_grid_runs_its_most_promising_rates_first(tmp_path, finetune, generator_first):
    """A LoRA generator's largest rate first, a fully fine-tuned model's (the embedder's) smallest;
    without early stopping the grid runs as listed."""
    grid = [
        {"lr_embedder": embedder, "lr_generator": generator}
        for embedder in [1e-6, 1e-5, 1e-4]
        for generator in [1e-5, 1e-4, 1e-3]
    ]
    models = TINY_SPEC["models"] | {"generator_finetune": finetune}
    stopping = _spec(tmp_path, {"models": models, "search": {"early_stopping": True}})
    assert _run_order(grid, stopping)[0] == {"lr_embedder": 1e-6, "lr_generator": generator_first}
    embedder_only = [{"lr_embedder": rate} for rate in [1e-4, 1e-6, 1e-5]]
    assert [point["lr_embedder"] for point in _run_order(embedder_only, stopping)] == [
        1e-6,
        1e-5,
        1e-4,
    ]
    listed = _spec(tmp_path, {"models": models})
    assert _run_order(grid, listed) == grid
