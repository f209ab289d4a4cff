"""A method is one declaration: a toy method declared here is planned, launched on a real local Ray
and compared, with no other change to ragsweep."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from search.launch.dispatch import launch
from search.plan import make_plan
from search.query.compare import compare
from search.query.report import load_study
from search.spec import load_spec
from search.store import open_database
from tests.tiny import TINY_SPEC
from trainers import MethodDeclaration, TrainedPhase, register_method

# ft_gen trained on the answer's NLL given the concatenated top-k, whatever ft_gen_objective says.
FT_GEN_CONCAT = MethodDeclaration(
    "ft_gen_concat", (TrainedPhase("generator", False, True, "nll_concat"),), rank=25
)


@pytest.fixture(scope="module")
def declared() -> MethodDeclaration:
    return register_method(FT_GEN_CONCAT)


@pytest.mark.xdist_group("test_new_method")
def test_a_declared_method_is_planned_launched_and_compared(declared, tmp_path, cache_dir):
    path = tmp_path / "toy.yaml"
    spec_fields = TINY_SPEC | {
        "name": "toy",
        "methods": ["none", declared.name],
        "search": {"lr_embedder": [1e-3], "lr_generator": [1e-3, 3e-3]},
    }
    path.write_text(yaml.safe_dump(spec_fields))
    spec = load_spec(path)

    plan = make_plan(spec)
    toy = plan.stage(declared.name)
    assert (toy.method, toy.searched, toy.n_trials) == (declared.name, ("lr_generator",), 2)
    assert toy.depends_on == () and toy.forecast_s is not None

    url = f"sqlite:///{tmp_path / 'toy.db'}"
    summary = launch(spec, storage_url=url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)
    assert summary.ran == {"none": 1, declared.name: 2}
    assert summary.failed == {"none": 0, declared.name: 0}
    trials = optuna.load_study(study_name=f"toy/{declared.name}", storage=url).trials
    assert {trial.params["lr_generator"] for trial in trials} == {1e-3, 3e-3}
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)

    comparison = compare(load_study(open_database(url), "toy"))
    rows = {row.method: row for row in comparison.rows}
    assert set(rows) == {"none", declared.name}
    assert rows[declared.name].chosen is not None
    assert rows[declared.name].run_flops and rows[declared.name].run_flops > 0
    assert Path(tmp_path / "toy.db").is_file()
