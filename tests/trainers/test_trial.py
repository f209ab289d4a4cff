"""Every method end to end on tiny real models: runs, routes gradients, reuses phases, repeats."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tiny import TINY_DATA, TINY_TRAINING, tiny_config
from trainers.data import load_data
from trainers.errors import ConfigError
from trainers.methods import method_phases
from trainers.trial import TrialResult, run_trial

# One worker runs this module under xdist: its tests share the trials ``default_trial`` ran.
pytestmark = pytest.mark.xdist_group("test_trial")


@pytest.fixture(scope="module")
def trial_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trials")


@pytest.fixture(scope="module")
def default_trial(cache_dir: Path, trial_dir: Path) -> Callable[[str], TrialResult]:
    """Each method's default tiny trial, run once for the module (several tests read the same
    run); its models are saved under ``trial_dir/<method>`` for the tests that reuse them."""
    results: dict[str, TrialResult] = {}

    def run(method: str) -> TrialResult:
        if method not in results:
            results[method] = run_trial(
                tiny_config(method), cache_dir=cache_dir, out_dir=trial_dir / method
            )
        return results[method]

    return run


@pytest.mark.parametrize(
    "method",
    ["none", "ft_embed", "ft_gen", "independent", "two_phase", "rag_token", "rag_sequence"],
)
def test_every_method_runs_and_reports_quality_and_cost(method, default_trial):
    result = default_trial(method)
    metrics = result.metrics
    assert 0.0 <= metrics["em"] <= metrics["f1"] <= 1.0
    assert 0.0 <= metrics["recall_at_k"] <= 1.0
    assert metrics["wall_s"] > 0 and metrics["flops"] > 0 and metrics["tokens"] > 0
    train = load_data(TINY_DATA).train
    pairs = sum(len(record.gold_doc_ids) for record in train)  # MNRL: one item per gold document
    phases = method_phases(method, TINY_TRAINING)
    for phase in phases:
        items = pairs if phase.objective == "mnrl" else len(train)
        assert metrics[f"{phase.name}.steps"] == math.ceil(items / 4)  # batch 4, one epoch
        assert metrics[f"{phase.name}.flops"] > 0
    assert metrics["train_steps"] == sum(metrics[f"{phase.name}.steps"] for phase in phases)
    assert result.record["data_fingerprint"] and result.record["split"]["validation_ids"]
    assert len(result.predictions) == 8


def test_same_trial_twice_gives_the_same_metrics(default_trial, cache_dir):
    first = default_trial("rag_token")
    second = run_trial(tiny_config("rag_token"), cache_dir=cache_dir)
    quality = ("em", "f1", "recall_at_k")
    assert {k: first.metrics[k] for k in quality} == {k: second.metrics[k] for k in quality}
    assert first.predictions == second.predictions
    assert first.record["final_losses"] == second.record["final_losses"]


def test_a_different_seed_trains_differently(default_trial, cache_dir):
    first = default_trial("ft_gen")
    second = run_trial(tiny_config("ft_gen", seed=1), cache_dir=cache_dir)
    assert first.record["final_losses"] != second.record["final_losses"]


def test_the_index_is_encoded_once_and_then_read_from_cache(tmp_path):
    cache_dir = tmp_path  # empty: the first trial must encode the corpus
    config = tiny_config("none")
    first = run_trial(config, cache_dir=cache_dir)
    second = run_trial(config, cache_dir=cache_dir)
    assert first.metrics["index_cache_hit"] == 0.0 and second.metrics["index_cache_hit"] == 1.0
    assert first.metrics["index.tokens"] > 0 and second.metrics["index.tokens"] == 0
    assert first.metrics["recall_at_k"] == second.metrics["recall_at_k"]


def test_independent_composed_from_checkpoints_equals_independent_trained(
    default_trial, trial_dir, cache_dir
):
    ft_gen = default_trial("ft_gen")
    ft_embed = default_trial("ft_embed")
    reuse = {
        "generator": str(trial_dir / "ft_gen" / "generator"),
        "embedder": str(trial_dir / "ft_embed" / "embedder"),
    }
    composed = run_trial(tiny_config("independent", reuse=reuse), cache_dir=cache_dir)
    trained = default_trial("independent")
    assert composed.metrics["train_steps"] == 0
    assert (
        composed.metrics["recall_at_k"]
        == ft_embed.metrics["recall_at_k"]
        == trained.metrics["recall_at_k"]
    )
    assert composed.predictions == trained.predictions
    assert ft_gen.record["final_losses"]["generator"] == trained.record["final_losses"]["generator"]


def test_two_phase_refuses_a_phase_one_trained_with_another_objective(
    default_trial, trial_dir, cache_dir
):
    default_trial("ft_gen")  # nll_concat
    reuse = {"generator": str(trial_dir / "ft_gen" / "generator")}
    with pytest.raises(ConfigError, match="objective 'nll_concat'"):
        run_trial(tiny_config("two_phase", reuse=reuse), cache_dir=cache_dir)


def test_a_method_that_trains_a_model_needs_its_learning_rate(cache_dir):
    with pytest.raises(ConfigError, match="--lr-generator"):
        run_trial(tiny_config("ft_gen", lr_generator=None), cache_dir=cache_dir)
    with pytest.raises(ConfigError, match="--lr-embedder"):
        run_trial(tiny_config("rag_sequence", lr_embedder=None), cache_dir=cache_dir)


def test_k_larger_than_the_corpus_is_refused(cache_dir):
    training = TINY_TRAINING.model_copy(update={"k": 100_000})
    with pytest.raises(ConfigError, match="lower k"):
        run_trial(tiny_config("none", training=training), cache_dir=cache_dir)


def test_a_diverging_phase_raises_a_training_error(cache_dir):
    from trainers.errors import TrainingError

    with pytest.raises(TrainingError, match="lower the learning rate"):
        run_trial(tiny_config("ft_gen", lr_generator=1e30), cache_dir=cache_dir)
