"""Every method end to end on tiny real models: runs, routes gradients, reuses phases, repeats."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import TINY_DATA, TINY_TRAINING, tiny_config
from trainers.config import DataConfig, IndexConfig
from trainers.cost import CostMeter
from trainers.data import load_data
from trainers.errors import ConfigError
from trainers.evaluate import evaluate_pipeline, gold_reciprocal_ranks
from trainers.memory import token_caps
from trainers.methods import method_phases
from trainers.results import questions_json
from trainers.rungs import Rung, Rungs
from trainers.trial import TrialResult, build_pipeline, run_trial

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


def test_the_record_holds_the_index_searched_and_the_config_only_a_chosen_one(
    default_trial, cache_dir
):
    default = default_trial("none")
    assert default.record["index"] == {"kind": "flat"}  # auto, on a small corpus
    assert "index" not in default.record["config"]["training"]
    training = TINY_TRAINING.model_copy(update={"index": IndexConfig(kind="hnsw")})
    hnsw = run_trial(tiny_config("none", training=training), cache_dir=cache_dir)
    assert hnsw.record["index"] == {"kind": "hnsw", "hnsw_links": 32, "hnsw_ef_search": 128}
    assert hnsw.record["config"]["training"]["index"]["kind"] == "hnsw"
    # A graph search over a few dozen passages finds what exact search finds.
    assert hnsw.metrics["recall_at_k"] == default.metrics["recall_at_k"]


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


def test_a_reused_phase_whose_checkpoint_is_gone_is_trained_again_to_the_same_result(
    default_trial, tmp_path, cache_dir
):
    trained = default_trial("two_phase")
    gone = {"generator": str(tmp_path / "deleted" / "generator")}
    with pytest.raises(ConfigError, match="has no generator folder"):
        run_trial(tiny_config("two_phase", reuse=gone), cache_dir=cache_dir)
    again = run_trial(
        tiny_config("two_phase", reuse=gone), cache_dir=cache_dir, train_missing_reuse=True
    )
    # Phase 1 draws from its own seed, so training it here gives the lost checkpoint's weights.
    assert again.record["retrained_phases"] == ["generator"]
    assert again.record["reused_phases"] == []
    assert again.record["final_losses"] == trained.record["final_losses"]
    assert again.predictions == trained.predictions
    assert again.metrics["generator.steps"] == trained.metrics["generator.steps"] > 0


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


def _partly_labelled(folder: Path, n_labelled: int, validation: bool = True) -> DataConfig:
    """TINY_DATA's questions as JSONL (the same split), with gold documents on only
    ``n_labelled`` of its training questions; the validation questions keep theirs unless
    ``validation`` is False."""
    data = load_data(TINY_DATA)
    everything = load_data(TINY_DATA.model_copy(update={"n_train": None}))  # the same shuffle
    keep = {q.id for q in data.train[:n_labelled]}
    keep |= {q.id for q in data.validation} if validation else set()
    questions, corpus = folder / "questions.jsonl", folder / "corpus.jsonl"
    rows = [
        {
            "id": q.id,
            "question": q.question,
            "answers": list(q.answers),
            "gold_doc_ids": list(q.gold_doc_ids) if q.id in keep else [],
        }
        for q in (*everything.train, *everything.validation)
    ]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    documents = [
        {"id": d.id, "title": d.title, "text": d.text}
        for d in data.corpus.documents(range(len(data.corpus)))
    ]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in documents))
    return TINY_DATA.model_copy(
        update={"source": "jsonl", "path": str(questions), "corpus_path": str(corpus)}
    )


def test_ft_embed_trains_on_the_labelled_questions_of_partly_labelled_data(tmp_path, cache_dir):
    data = _partly_labelled(tmp_path, n_labelled=6)
    labelled = load_data(data).labelled_train
    assert [q.id for q in labelled] == [q.id for q in load_data(TINY_DATA).train[:6]]
    result = run_trial(tiny_config("ft_embed", data=data), cache_dir=cache_dir)
    assert result.record["has_context_labels"] is True
    assert result.record["labelled_train_questions"] == 6
    items = sum(len(q.gold_doc_ids) for q in labelled)  # one MNRL item per gold document
    assert result.metrics["embedder.steps"] == math.ceil(items / 4)  # batch 4, one epoch
    assert 0.0 <= result.metrics["recall_at_k"] <= 1.0


@pytest.mark.parametrize("method", ["ft_embed", "independent"])
def test_too_few_labelled_training_questions_are_refused_with_the_counts(
    tmp_path, cache_dir, method
):
    data = _partly_labelled(tmp_path, n_labelled=1)
    with pytest.raises(ConfigError) as error:
        run_trial(tiny_config(method, data=data), cache_dir=cache_dir)
    message = str(error.value)
    assert f"method '{method}'" in message and "\n" not in message
    assert "only 1 of 16 training questions has a gold document (at least 2" in message
    assert "gold_doc_ids" in message and "two_phase" in message


@pytest.mark.parametrize("method", ["ft_embed", "ft_gen"])
def test_per_question_results_add_up_to_the_metrics_and_their_hash_is_recorded(
    method, default_trial
):
    result = default_trial(method)
    validation = load_data(TINY_DATA).validation
    assert [question.id for question in result.questions] == [r.id for r in validation]
    assert [question.prediction for question in result.questions] == result.predictions
    assert statistics.fmean(q.em for q in result.questions) == pytest.approx(result.metrics["em"])
    assert statistics.fmean(q.f1 for q in result.questions) == pytest.approx(result.metrics["f1"])
    recalls = [q.recall for q in result.questions if q.recall is not None]
    assert statistics.fmean(recalls) == pytest.approx(result.metrics["recall_at_k"])
    assert all(len(q.retrieved) == TINY_TRAINING.k for q in result.questions)
    digest = hashlib.sha256(questions_json(result.questions).encode()).hexdigest()
    assert result.record["questions_sha256"] == digest


def test_a_test_split_is_scored_apart_and_changes_nothing_on_validation(default_trial, cache_dir):
    plain = default_trial("ft_gen")
    data = TINY_DATA.model_copy(update={"n_test": 6})
    held_out = run_trial(tiny_config("ft_gen", data=data), cache_dir=cache_dir)
    for name in ("em", "f1", "recall_at_k"):
        assert held_out.metrics[name] == plain.metrics[name]
        assert 0 <= held_out.metrics[f"test_{name}"] <= 1
        assert f"test_{name}" not in plain.metrics
    assert held_out.metrics["test.device_s"] > 0 and held_out.metrics["test.tokens"] > 0
    assert held_out.record["test_scored"] is True and "test_scored" not in plain.record
    assert len(held_out.record["split"]["test_ids"]) == 6
    assert held_out.questions == plain.questions  # the per-question results are validation's


def test_a_trial_told_not_to_score_the_test_split_skips_it_after_validation(
    default_trial, cache_dir
):
    plain = default_trial("ft_gen")
    data = TINY_DATA.model_copy(update={"n_test": 6})
    asked: list[dict[str, float]] = []

    def trails(validation: dict[str, float]) -> bool:
        asked.append(validation)
        return False

    skipped = run_trial(tiny_config("ft_gen", data=data), cache_dir=cache_dir, score_test=trails)
    # Asked once, with the validation scores; nothing of the test split scored or costed.
    assert asked == [{name: plain.metrics[name] for name in ("em", "f1", "recall_at_k")}]
    assert not {name for name in skipped.metrics if name.startswith("test")}
    assert skipped.record["test_scored"] is False
    assert len(skipped.record["split"]["test_ids"]) == 6  # still held out of training
    assert skipped.questions == plain.questions


def test_retrieval_evaluation_scores_recall_alone_and_retrieves_as_answers_do(
    default_trial, cache_dir
):
    answered = default_trial("ft_embed")
    training = TINY_TRAINING.model_copy(update={"evaluate": "retrieval"})
    data = TINY_DATA.model_copy(update={"n_test": 6})
    retrieved = run_trial(
        tiny_config("ft_embed", training=training, data=data), cache_dir=cache_dir
    )
    # The same embedder training, so the same passages and Recall@k; nothing generated.
    assert [q.retrieved for q in retrieved.questions] == [q.retrieved for q in answered.questions]
    assert [q.recall for q in retrieved.questions] == [q.recall for q in answered.questions]
    assert retrieved.metrics["recall_at_k"] == answered.metrics["recall_at_k"]
    assert {q.prediction for q in retrieved.questions} == {None} and retrieved.predictions == []
    assert {q.em for q in retrieved.questions} == {q.f1 for q in retrieved.questions} == {None}
    assert not {"em", "f1", "test_em", "test_f1"} & set(retrieved.metrics)
    assert 0 <= retrieved.metrics["test_recall_at_k"] <= 1
    # Encoding the questions is all evaluation costs: a small part of generating answers, even
    # with a tiny generator that writes 4 tokens (7x here).
    assert 0 < retrieved.metrics["eval.flops"] < answered.metrics["eval.flops"] / 5
    assert retrieved.metrics["eval.steps"] == 0
    assert retrieved.record["config"]["training"]["evaluate"] == "retrieval"
    assert "evaluate" not in answered.record["config"]["training"]  # older configs hash alike


def test_retrieval_evaluation_needs_labelled_validation_questions(tmp_path, cache_dir):
    data = _partly_labelled(tmp_path, n_labelled=6, validation=False)
    training = TINY_TRAINING.model_copy(update={"evaluate": "retrieval"})
    with pytest.raises(ConfigError, match="no validation question has a gold document"):
        run_trial(tiny_config("none", data=data, training=training), cache_dir=cache_dir)


def test_the_record_counts_labelled_questions_for_a_fully_labelled_set(default_trial):
    record = default_trial("ft_embed").record
    assert record["has_context_labels"] is True
    assert record["labelled_train_questions"] == len(load_data(TINY_DATA).train)


@pytest.mark.parametrize("method", ["ft_gen", "two_phase", "rag_token"])
def test_rungs_report_part_way_and_change_nothing(method, default_trial, cache_dir):
    """A trial with rungs reports a signal at a quarter and half of each phase it trains, with
    its cost so far, and ends with the same quality and losses as the same trial without."""
    plain = default_trial(method)
    heard: list[Rung] = []
    with_rungs = run_trial(
        tiny_config(method), cache_dir=cache_dir, rungs=Rungs((0.25, 0.5), 4, heard.append)
    )
    for name in ("em", "f1", "recall_at_k"):
        assert with_rungs.metrics[name] == plain.metrics[name]
    assert with_rungs.predictions == plain.predictions
    assert with_rungs.record["final_losses"] == plain.record["final_losses"]
    trained = method_phases(method, TINY_TRAINING)  # two_phase trains two here
    # 4 steps per phase: rungs after steps 1 and 2 of each trained phase, numbered in turn.
    assert [(r.number, r.phase, r.step, r.steps) for r in heard] == [
        (2 * i + n, phase.name, n, 4) for i, phase in enumerate(trained) for n in (1, 2)
    ]
    # A phase that trains the embedder alone reads its passages' reciprocal rank on
    # every labelled validation question; one training the generator its answers' on the first 4.
    validation = load_data(TINY_DATA).validation
    for rung, phase in zip(heard, [p for p in trained for _ in (1, 2)], strict=True):
        if phase.trains_generator:
            assert rung.signal == "answer_logprob"
            assert list(rung.per_question) == [record.id for record in validation[:4]]
            assert all(math.isfinite(v) and v < 0 for v in rung.per_question.values())
        else:
            assert rung.signal == "gold_doc_rr"
            assert list(rung.per_question) == [r.id for r in validation if r.gold_doc_ids]
            assert all(0 <= v <= 1 for v in rung.per_question.values())
        assert rung.value == pytest.approx(statistics.fmean(rung.per_question.values()))
    assert heard[0].metrics["train_device_s"] > 0
    assert heard[1].metrics["train_flops"] > heard[0].metrics["train_flops"]
    assert with_rungs.record["rungs"] == [r.summary() for r in heard]
    assert "rungs" not in plain.record


def test_a_rung_report_that_raises_stops_the_trial(cache_dir):
    def stop(rung: Rung) -> None:
        raise _Stopped(rung.number)

    with pytest.raises(_Stopped):
        run_trial(tiny_config("ft_gen"), cache_dir=cache_dir, rungs=Rungs((0.5,), 4, stop))


class _Stopped(Exception):
    pass


def test_the_passage_signal_ranks_as_evaluation_retrieves(cache_dir):
    """A gold passage's reciprocal rank is 1 / its place in the documents evaluation reads, and
    below 1 / k exactly when evaluation's top k misses it."""
    meter = CostMeter(torch.device("cpu"))
    data, pipeline = build_pipeline(tiny_config("none"), cache_dir=cache_dir, meter=meter)
    labelled = [record for record in data.validation if len(record.gold_doc_ids) == 1]
    with meter.phase("signal") as cost:
        ranks = gold_reciprocal_ranks(pipeline, labelled, cost)
        evaluation = evaluate_pipeline(pipeline, labelled, cost)
    assert len(labelled) >= 4 and cost.tokens > 0
    for rank, question, record in zip(ranks, evaluation.questions, labelled, strict=True):
        (gold,) = record.gold_doc_ids
        if gold in question.retrieved:
            assert rank == pytest.approx(1 / (question.retrieved.index(gold) + 1))
        else:
            assert rank < 1 / len(question.retrieved)


def test_a_trial_measures_how_full_its_prompts_fill_the_token_caps(cache_dir):
    """Passages cut to a small cap fill it; under a large cap they fill a small part of it. The
    fill is the 90th percentile of the prompts' token counts, beyond the template's overhead."""
    fills = {}
    for max_doc_tokens in (4, 256):
        training = TINY_TRAINING.model_copy(update={"max_doc_tokens": max_doc_tokens})
        meter = CostMeter(torch.device("cpu"))
        config = tiny_config("none", training=training)
        data, pipeline = build_pipeline(config, cache_dir=cache_dir, meter=meter)
        fills[max_doc_tokens] = fill = pipeline.training.prompt_fill
        # Tokenized here as a trial tokenizes a prompt, not through the builder's own count.
        tokenizer, k = pipeline.generator.tokenizer, training.k
        lengths = []
        for question in data.train:
            rows = [int(row) for row in data.corpus.lookup(question.gold_doc_ids)]
            rows += [row % len(data.corpus) for row in range(max(rows) + 1, max(rows) + 1 + k)]
            prompt = pipeline.prompts.prompt(question.question, data.corpus.documents(rows[:k]))
            answer = tokenizer(question.answers[0], add_special_tokens=False).input_ids
            lengths.append(len(tokenizer(prompt, add_special_tokens=False).input_ids) + len(answer))
        caps = training.max_question_tokens + k * max_doc_tokens + training.max_answer_tokens
        assert fill == pytest.approx((np.percentile(lengths, 90) - 40) / caps, abs=1e-3)
        # The forecast's prompt length: what the data's long prompts hold.
        assert token_caps(pipeline.training).concat_prompt == pytest.approx(
            np.percentile(lengths, 90), abs=caps * 1e-3
        )
        assert config.training.prompt_fill is None  # the config as given: a rerun measures again
    assert fills[4] > 2 * fills[256]
