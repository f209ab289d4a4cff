"""The reproduction specs users copy (studies/*-cpu.yaml, *-embedder.yaml), launched end to end
on SQLite.

Each spec runs as written (methods, grids, stages, reuse, the paper's prompt) on its real local
sample from ../shared/data, with the only changes the ones a CI machine needs: tiny models, a
handful of questions and short token caps. docs/REPRODUCTION.md holds the full-size runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest

from search.launch.dispatch import launch
from search.plan import make_plan
from search.spec import load_spec
from search.store import open_storage, read_trials
from tests.held_out import assert_leaders_scored_test
from tests.tiny import TINY_TRAINING

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
SPECS = {
    "popqa-cpu": SHARED_DATA / "popqa_hipporag2_subset" / "popqa.json",
    "hotpotqa-cpu": SHARED_DATA / "hotpotqa_ircot_dev500" / "dev_subsampled.jsonl",
}


def _tiny(spec_name: str, data_path: Path, study_name: str):
    """The spec with tiny models and 8 + 4 questions of the local sample: nothing else changes."""
    return load_spec(
        ROOT / "studies" / f"{spec_name}.yaml",
        {
            "name": study_name,
            "data.path": str(data_path),
            "data.n_train": 8,
            "data.n_validation": 4,
            "models.embedder": "tiny",
            "models.generator": "tiny",
            "training.batch_size_embedder": TINY_TRAINING.batch_size_embedder,
            "training.batch_size_generator": TINY_TRAINING.batch_size_generator,
            "training.max_doc_tokens": TINY_TRAINING.max_doc_tokens,
            "training.max_new_tokens": TINY_TRAINING.max_new_tokens,
            "training.precision": "fp32",
        },
    )


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_spec_runs_every_method_and_answers_compare(spec_name, tmp_path, cache_dir):
    data_path = SPECS[spec_name]
    if not data_path.exists():
        pytest.skip(f"{data_path} not present (it is beside the repo only on dev/CI machines)")
    spec = _tiny(spec_name, data_path, f"{spec_name}-{uuid.uuid4().hex[:8]}")
    # The shape the reproduction relies on: every method, at least 3 rates per model, k = 5,
    # ft_gen shared with two_phase, the joint methods on two_phase's pair.
    assert spec.methods == [
        "none", "ft_embed", "ft_gen", "independent", "two_phase", "rag_token", "rag_sequence"
    ]  # fmt: skip
    assert len(spec.search.lr_embedder) >= 3 and len(spec.search.lr_generator) >= 3
    assert spec.training.k == 5 and spec.training.epochs == 1
    planned = make_plan(spec).total_trials

    url = f"sqlite:///{tmp_path / 'study.db'}"
    summary = launch(spec, storage_url=url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)

    storage = open_storage(url)
    trials = [
        trial
        for name in optuna.get_all_study_names(storage)
        for trial in optuna.load_study(study_name=name, storage=storage).trials
    ]
    assert len(trials) == planned, summary
    failed = [
        (t.number, t.user_attrs.get("fail_reason")) for t in trials if t.state.name != "COMPLETE"
    ]
    assert not failed
    result = subprocess.run(
        [sys.executable, "-c", "from search.cli import main; main()"]
        + ["compare", spec.name, "--storage", url, "--format", "json"],
        capture_output=True,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["method"]: row for row in json.loads(result.stdout)}
    assert list(rows) == spec.methods
    # Separable search: independent and two_phase each searched n + m rates, not n x m.
    n_plus_m = len(spec.search.lr_embedder) + len(spec.search.lr_generator)
    assert rows["independent"]["search_trials"] == n_plus_m + 1  # + its one combining trial
    assert rows["two_phase"]["search_stages"] == {
        "ft_gen": len(spec.search.lr_generator),
        "two_phase": len(spec.search.lr_embedder),
    }


@pytest.mark.parametrize("data_name", ["popqa", "hotpotqa"])
def test_the_embedder_spec_scores_retrieval_alone_over_its_grid(data_name, tmp_path, cache_dir):
    data_path = SPECS[f"{data_name}-cpu"]
    if not data_path.exists():
        pytest.skip(f"{data_path} not present (it is beside the repo only on dev/CI machines)")
    spec_name = f"{data_name}-embedder"
    spec = _tiny(spec_name, data_path, f"{spec_name}-{uuid.uuid4().hex[:8]}")
    assert spec.methods == ["none", "ft_embed"] and spec.training.evaluate == "retrieval"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    launch(spec, storage_url=url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)
    storage = open_storage(url)
    trials = {
        (name.split("/", 1)[1], trial.params.get("lr_embedder")): trial
        for name in optuna.get_all_study_names(storage)
        for trial in optuna.load_study(study_name=name, storage=storage).trials
    }
    assert set(trials) == {("none", None)} | {("ft_embed", lr) for lr in spec.search.lr_embedder}
    for trial in trials.values():
        assert trial.state.name == "COMPLETE", trial.user_attrs.get("fail_reason")
        metrics = trial.user_attrs["metrics"]
        assert trial.value == metrics["recall_at_k"] and "f1" not in metrics
    # PopQA's spec holds out 300 test questions, also scored on retrieval alone, by the trials
    # that led their stage as they finished.
    for name in optuna.get_all_study_names(storage):
        stage = read_trials(optuna.load_study(study_name=name, storage=storage))
        if spec.data.n_test:
            assert_leaders_scored_test(stage, "recall_at_k")
        else:
            assert not any("test_recall_at_k" in trial.metrics for trial in stage)
