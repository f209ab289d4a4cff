"""Every sampler a spec can name, launched end to end on the tiny models: the stored trials are
the budget's, inside the searched ranges, and (tpe) modelled after a third of the budget, not
random search for a budget of about ten trials."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from search.launch._optuna_search import stage_sampler
from search.launch.dispatch import launch
from search.spec import StudySpec, load_spec
from search.store import open_storage
from tests.tiny import TINY_SPEC

RANGE = (1e-4, 1e-2)
BUDGET = 4
QUALITY_AND_COST = [
    {"metric": "f1", "direction": "maximize"},
    {"metric": "train_flops", "direction": "minimize"},
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampler", "objectives"),
    [("tpe", None), ("random", None), ("tpe", QUALITY_AND_COST)],
    ids=["tpe", "random", "tpe_two_objectives"],
)
def test_a_sampled_study_runs_its_budget_inside_the_range(sampler, objectives, tmp_path, cache_dir):
    name = f"sampled-{sampler}-{len(objectives or [1])}"
    fields = {
        "name": name,
        "methods": ["ft_gen"],
        "search": {"sampler": sampler, "n_trials": BUDGET, "lr_generator_range": list(RANGE)},
        "concurrency": 2,
    }
    if objectives:
        fields["objectives"] = objectives
    spec = _spec(tmp_path, fields)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    summary = launch(spec, storage_url=url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)

    assert summary.ran == {"ft_gen": BUDGET} and summary.failed == {"ft_gen": 0}
    study = optuna.load_study(study_name=f"{name}/ft_gen", storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * BUDGET
    rates = [t.params["lr_generator"] for t in trials]
    assert len(set(rates)) == BUDGET and all(RANGE[0] <= rate <= RANGE[1] for rate in rates)
    assert all(not math.isnan(value) for t in trials for value in t.values)
    assert [len(t.values) for t in trials] == [len(objectives or [1])] * BUDGET
    if objectives:
        front = study.best_trials
        assert front and all(t in trials for t in front)
    # A relaunch adds nothing: the budget is spent.
    again = launch(spec, storage_url=url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)
    assert sum(again.ran.values()) == 0
    assert len(study.get_trials(deepcopy=False)) == BUDGET


@pytest.mark.parametrize("budget", [3, 9, 30, 81])
def test_tpe_models_after_a_third_of_the_budget(budget, tmp_path):
    """TPE samples at random for its first trials (10 by default): with budgets of about ten,
    that is random search. A stage's TPE explores a third of its budget, then models."""
    spec = _spec(tmp_path, {"search": {"sampler": "tpe", "n_trials": budget}})
    sampler = stage_sampler(spec, budget)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == max(1, budget // 3)  # noqa: SLF001 (no public getter)


def test_random_and_grid_stages_sample_at_random(tmp_path):
    for name in ("random", "grid"):
        spec = _spec(tmp_path, {"search": {"sampler": name}})
        assert isinstance(stage_sampler(spec, 9), optuna.samplers.RandomSampler)


def _spec(folder: Path, fields: dict) -> StudySpec:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(TINY_SPEC | fields))
    return load_spec(path)
