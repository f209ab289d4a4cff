"""``launch`` on a real local Ray and a real database: stages, records, reuse, relaunch, failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import ray
import yaml

from search.launch.dispatch import StageEvent, launch
from search.spec import StudySpec, load_spec
from search.store import open_storage, spec_hash
from tests.storage import storage_url_for
from tests.tiny import TINY_SPEC
from trainers import prepare
from trainers.errors import ConfigError

TINY_STUDY = TINY_SPEC | {
    "methods": ["none", "ft_embed", "ft_gen", "independent", "two_phase", "rag_token"],
    "training": TINY_SPEC["training"] | {"ft_gen_objective": "rag_token"},  # two_phase's phase 1
    # 1e30 diverges: a trial that fails by itself, which the study must survive.
    "search": {"lr_embedder": [1e-4, 1e-3], "lr_generator": [1e-3, 1e30], "joint": "reuse"},
    "concurrency": 2,
}


def tiny_spec(tmp_path: Path, **changes) -> StudySpec:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_STUDY | changes))
    return load_spec(path)


# Under xdist, one worker runs the tests on each backend's launch (``launched``).
@pytest.fixture(
    scope="module",
    params=[
        pytest.param(backend, marks=pytest.mark.xdist_group(f"test_dispatch_{backend}"))
        for backend in ("sqlite", "postgresql")
    ],
)
def storage_url(request, tmp_path_factory) -> str:
    return storage_url_for(request.param, tmp_path_factory.mktemp("db"))


@pytest.fixture(scope="module")
def launched(storage_url, tmp_path_factory, cache_dir):
    tmp_path = tmp_path_factory.mktemp("study")
    # Unique across test sessions: the PostgreSQL database outlives them when run by hand.
    spec = tiny_spec(tmp_path, name=f"tiny-{uuid.uuid4().hex[:8]}")
    runs_dir = Path(os.path.relpath(tmp_path / "runs"))  # relative, as a user's --runs-dir often is
    summary = launch(spec, storage_url=storage_url, runs_dir=runs_dir, cache_dir=cache_dir)
    storage = open_storage(storage_url)
    studies = {
        name.split("/", 1)[1]: optuna.load_study(study_name=name, storage=storage)
        for name in optuna.get_all_study_names(storage)
        if name.startswith(spec.name + "/")
    }
    return spec, summary, studies, storage_url, runs_dir


def test_every_stage_ran_its_trials(launched):
    spec, summary, studies, _, _ = launched
    assert set(studies) == {"none", "ft_embed", "ft_gen", "independent", "two_phase", "rag_token"}
    counts = {name: len(study.trials) for name, study in studies.items()}
    assert counts == {
        "none": 1,
        "ft_embed": 2,
        "ft_gen": 2,
        "independent": 1,
        "two_phase": 2,
        "rag_token": 1,
    }
    assert summary.ran == counts


def test_stages_that_do_not_depend_on_each_other_share_the_slots(launched):
    _, _, studies, _, _ = launched
    spans = [
        (name, trial.datetime_start, trial.datetime_complete)
        for name, study in studies.items()
        for trial in study.trials
    ]
    overlapping = {
        frozenset((a, b))
        for a, a_start, a_end in spans
        for b, b_start, b_end in spans
        if a != b and a_start < b_end and b_start < a_end
    }
    # Stage by stage, no two stages' trials would ever run at the same time.
    assert overlapping, "every stage ran alone"
    # A stage never overlaps one it builds on: two_phase starts after ft_gen's last trial.
    assert frozenset(("ft_gen", "two_phase")) not in overlapping
    assert frozenset(("ft_embed", "independent")) not in overlapping


def test_trials_carry_metrics_record_and_method(launched):
    _, _, studies, _, _ = launched
    trial = studies["ft_embed"].best_trial
    assert trial.user_attrs["method"] == "ft_embed" and trial.user_attrs["stage"] == "ft_embed"
    assert trial.values[0] == trial.user_attrs["metrics"]["f1"]
    assert (
        trial.user_attrs["metrics"]["recall_at_k"] >= 0
        and trial.user_attrs["metrics"]["train_flops"] > 0
    )
    record = trial.user_attrs["record"]
    assert record["config"]["lr_embedder"] == trial.params["lr_embedder"]
    assert record["data_fingerprint"] and record["environment"]["packages"]["torch"]
    assert studies["ft_embed"].user_attrs["ragsweep.group"] == launched[0].name


def test_every_trial_runs_with_the_prompt_fill_the_launch_measured(launched, cache_dir):
    spec, _, studies, _, _ = launched
    measured = prepare(spec.data, spec.models, [("none", spec.training)], cache_dir=cache_dir)
    assert measured is not None and measured > 0
    complete = optuna.trial.TrialState.COMPLETE
    completed = [t for study in studies.values() for t in study.trials if t.state == complete]
    for trial in completed:
        record = trial.user_attrs["record"]
        # The memory Ray reserved and the trial's own RAG forwards came from the same fill.
        assert record["config"]["training"]["prompt_fill"] == measured
        assert record["prompt_fill"] == measured
    # The studies keep the spec as given: a relaunch of it matches them.
    for study in studies.values():
        assert study.user_attrs["ragsweep.spec_hash"] == spec_hash(spec)


def test_a_diverging_trial_is_failed_with_its_reason_and_the_study_goes_on(launched):
    _, _, studies, _, _ = launched
    by_rate = {t.params["lr_generator"]: t for t in studies["ft_gen"].trials}
    assert by_rate[1e30].state == optuna.trial.TrialState.FAIL
    assert "diverged" in by_rate[1e30].user_attrs["fail_reason"]
    assert by_rate[1e-3].state == optuna.trial.TrialState.COMPLETE
    assert studies["two_phase"].best_trial.user_attrs["record"]["config"]["lr_generator"] == 1e-3


def test_independent_and_two_phase_reuse_the_best_checkpoints(launched):
    _, _, studies, _, runs_dir = launched
    independent = studies["independent"].trials[0]
    assert independent.user_attrs["metrics"]["train_steps"] == 0
    assert independent.user_attrs["record"]["reused_phases"] == ["embedder", "generator"]
    assert (
        studies["independent"].trials[0].user_attrs["metrics"]["recall_at_k"]
        == studies["ft_embed"].best_trial.user_attrs["metrics"]["recall_at_k"]
    )
    two_phase = studies["two_phase"].best_trial.user_attrs["record"]
    assert two_phase["reused_phases"] == ["generator"]  # phase 1 is ft_gen's best run
    # Only the best checkpoint of a reused stage is kept.
    kept = [
        t
        for t in studies["ft_embed"].trials
        if Path(t.user_attrs.get("checkpoint", "/nonexistent")).exists()
    ]
    assert [t.number for t in kept] == [studies["ft_embed"].best_trial.number]


def test_joint_method_reuses_two_phase_learning_rates(launched):
    _, _, studies, _, _ = launched
    joint = studies["rag_token"].trials[0].user_attrs["record"]["config"]
    best_two_phase = studies["two_phase"].best_trial.user_attrs["record"]["config"]
    assert (joint["lr_embedder"], joint["lr_generator"]) == (
        best_two_phase["lr_embedder"],
        best_two_phase["lr_generator"],
    )


def test_relaunching_a_finished_study_adds_no_trials(launched, tmp_path, cache_dir):
    spec, _, studies, storage_url, runs_dir = launched
    summary = launch(spec, storage_url=storage_url, runs_dir=runs_dir, cache_dir=cache_dir)
    assert sum(summary.ran.values()) == 0
    storage = open_storage(storage_url)
    assert {
        name: len(optuna.load_study(study_name=f"{spec.name}/{name}", storage=storage).trials)
        for name in studies
    } == {name: len(study.trials) for name, study in studies.items()}


def test_a_relaunch_without_the_checkpoints_trains_the_reused_phase_again(tmp_path, cache_dir):
    spec = tiny_spec(
        tmp_path,
        name="lost-checkpoints",
        methods=["ft_gen", "two_phase"],
        search={"lr_embedder": [1e-3], "lr_generator": [1e-3]},
    )
    url = f"sqlite:///{tmp_path / 'study.db'}"
    runs_dir = tmp_path / "runs"
    launch(spec, storage_url=url, runs_dir=runs_dir, cache_dir=cache_dir)
    storage = open_storage(url)
    first = optuna.load_study(study_name="lost-checkpoints/two_phase", storage=storage).trials[0]
    assert first.user_attrs["record"]["reused_phases"] == ["generator"]
    # As after a resume on a new machine: ft_gen's stage is stored, its checkpoints are gone and
    # two_phase has yet to run.
    shutil.rmtree(runs_dir)
    optuna.delete_study(study_name="lost-checkpoints/two_phase", storage=storage)
    summary = launch(spec, storage_url=url, runs_dir=runs_dir, cache_dir=cache_dir)
    assert summary.ran == {"two_phase": 1}
    again = optuna.load_study(study_name="lost-checkpoints/two_phase", storage=storage).trials[0]
    assert again.state == optuna.trial.TrialState.COMPLETE, again.user_attrs.get("fail_reason")
    assert again.user_attrs["record"]["retrained_phases"] == ["generator"]
    for metric in ("em", "f1", "recall_at_k"):  # the same weights on CPU as the lost checkpoint's
        assert again.user_attrs["metrics"][metric] == first.user_attrs["metrics"][metric]


def test_a_different_spec_under_the_same_name_is_refused(launched, cache_dir):
    spec, _, _, storage_url, runs_dir = launched
    changed = spec.model_copy(update={"seed": spec.seed + 1})
    with pytest.raises(ConfigError, match="different spec"):
        launch(changed, storage_url=storage_url, runs_dir=runs_dir, cache_dir=cache_dir)


def test_optuna_cli_lists_the_studies(launched):
    spec, _, studies, storage_url, _ = launched
    optuna_cli = Path(sys.executable).parent / "optuna"
    listed = subprocess.run(
        [str(optuna_cli), "studies", "--storage", storage_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    for name in studies:
        assert f"{spec.name}/{name}" in listed.stdout


def test_quality_and_cost_as_two_objectives(tmp_path, cache_dir):
    objectives = [
        {"metric": "f1", "direction": "maximize"},
        {"metric": "train_flops", "direction": "minimize"},
    ]
    spec = tiny_spec(
        tmp_path,
        name="pareto",
        methods=["ft_gen"],
        search={"lr_generator": [1e-4, 1e-3]},
        objectives=objectives,
    )
    storage_url = f"sqlite:///{tmp_path / 'pareto.db'}"
    node = ray.get_runtime_context().get_node_id()  # this process's Ray (tests/search/conftest.py)
    launch(spec, storage_url=storage_url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)
    # A launch leaves running the Ray it found: the caller's to stop.
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node
    study = optuna.load_study(study_name="pareto/ft_gen", storage=open_storage(storage_url))
    assert [len(t.values) for t in study.trials] == [2, 2]
    assert study.trials[0].values[1] == study.trials[0].user_attrs["metrics"]["train_flops"] > 0
    assert 1 <= len(study.best_trials) <= 2  # the Pareto front


def test_bad_data_fails_before_any_study_is_written(tmp_path, cache_dir):
    from trainers.errors import DataError

    data = {"source": "hotpotqa", "path": str(tmp_path / "missing.jsonl")}
    spec = tiny_spec(tmp_path, name="bad-data", data=data)
    storage_url = f"sqlite:///{tmp_path / 'bad.db'}"
    with pytest.raises(DataError, match="missing.jsonl"):
        launch(spec, storage_url=storage_url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)
    assert optuna.get_all_study_names(open_storage(storage_url)) == []


def test_a_stage_whose_source_all_failed_is_blocked_and_the_others_run(tmp_path, cache_dir):
    # Every ft_embed trial diverges, so independent (which loads ft_embed's best) cannot run;
    # ft_gen does not depend on ft_embed and must still run.
    spec = tiny_spec(
        tmp_path,
        name="blocked",
        methods=["ft_embed", "independent", "ft_gen"],
        search={"lr_embedder": [1e30], "lr_generator": [1e-3]},
    )
    storage_url = f"sqlite:///{tmp_path / 'blocked.db'}"
    summary = launch(spec, storage_url=storage_url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)
    assert summary.failed["ft_embed"] == 1
    assert "ft_embed" in summary.blocked["independent"] and "independent" not in summary.ran
    storage = open_storage(storage_url)
    ft_gen = optuna.load_study(study_name="blocked/ft_gen", storage=storage)
    assert [t.state for t in ft_gen.trials] == [optuna.trial.TrialState.COMPLETE]
    assert not optuna.load_study(study_name="blocked/independent", storage=storage).trials


def test_when_tune_gives_up_the_running_trial_fails_retryable_and_the_rest_runs(
    tmp_path, cache_dir
):
    # An exception inside Tune's loop (here from the progress view, as a cluster fault can raise
    # one) ends Tune's run; the launch fails the running trial and goes on without it.
    spec = tiny_spec(
        tmp_path,
        name="tune-stops",
        methods=["ft_embed", "ft_gen", "independent"],
        search={"lr_embedder": [1e-4, 1e-3], "lr_generator": [1e-3]},
        concurrency=1,
    )
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    broke: list[str] = []

    def on_event(event: StageEvent) -> None:
        if event.kind == "trial_start" and not broke:
            broke.append(event.stage.name)
            raise RuntimeError("the progress view broke")

    runs_dir = tmp_path / "runs"
    summary = launch(  # no re-runs: the stopped trial is failed (test_faults.py: re-run)
        spec,
        storage_url=storage_url,
        runs_dir=runs_dir,
        cache_dir=cache_dir,
        on_event=on_event,
        max_retries=0,
    )
    assert broke == ["ft_embed"]  # ft_embed and ft_gen tie; ft_embed comes first in run order
    storage = open_storage(storage_url)
    ft_embed = optuna.load_study(study_name="tune-stops/ft_embed", storage=storage).trials
    assert [t.state for t in ft_embed] == [
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.COMPLETE,
    ]
    assert "Ray stopped the launch's run" in ft_embed[0].user_attrs["fail_reason"]
    assert ft_embed[0].user_attrs["retryable"] is True
    assert summary.failed == {"ft_embed": 1, "ft_gen": 0}
    assert "1 trial(s) stopped before they finished" in summary.blocked["independent"]

    summary = launch(spec, storage_url=storage_url, runs_dir=runs_dir, cache_dir=cache_dir)
    assert summary.ran == {"ft_embed": 1, "independent": 1} and not summary.blocked
