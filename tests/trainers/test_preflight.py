"""prepare: a study's data mistakes found once, before any trial, and the caches warmed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import TINY_DATA, TINY_MODELS, TINY_TRAINING, tiny_config
from trainers import ConfigError, DataConfig, load_data, prepare, run_trial


def _labelled(folder: Path, n_labelled: int) -> DataConfig:
    """Six questions, four of them for training; ``n_labelled`` of those have a gold document."""
    questions, corpus = folder / "questions.jsonl", folder / "corpus.jsonl"
    documents = [{"id": f"d{i}", "title": f"T{i}", "text": f"fact {i}"} for i in range(6)]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in documents))
    rows = [
        {"id": f"q{i}", "question": f"what is {i}?", "answers": [str(i)], "gold_doc_ids": []}
        for i in range(6)
    ]
    config = DataConfig(
        source="jsonl", path=str(questions), corpus_path=str(corpus), n_train=4, n_validation=2
    )
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    labelled = {q.id for q in load_data(config).train[:n_labelled]}  # the split reads ids only
    for i, row in enumerate(rows):
        row["gold_doc_ids"] = [f"d{i}"] if row["id"] in labelled else []
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return config


def test_prepare_warms_the_index_a_trial_then_reads(tmp_path):
    cache_dir = tmp_path / "cache"  # empty: prepare builds what trials read
    prepare(TINY_DATA, TINY_MODELS, [("none", TINY_TRAINING)], cache_dir=cache_dir)
    assert (cache_dir / "models").is_dir()
    result = run_trial(tiny_config("none"), cache_dir=cache_dir)
    assert result.metrics["index_cache_hit"] == 1.0


def test_prepare_names_the_first_method_that_needs_context_labels(tmp_path, cache_dir):
    data = _labelled(tmp_path, 0)
    trainings = [("two_phase", TINY_TRAINING), ("ft_embed", TINY_TRAINING)]
    with pytest.raises(ConfigError, match="'ft_embed'.*context labels.*two_phase") as error:
        prepare(data, TINY_MODELS, trainings, cache_dir=cache_dir)
    assert "\n" not in str(error.value)


def test_prepare_accepts_partly_labelled_data_and_refuses_too_few_labels(tmp_path, cache_dir):
    trainings = [("ft_embed", TINY_TRAINING), ("independent", TINY_TRAINING)]
    prepare(_labelled(tmp_path, 2), TINY_MODELS, trainings, cache_dir=cache_dir)  # 2 of 4: enough
    with pytest.raises(ConfigError) as error:
        prepare(_labelled(tmp_path, 1), TINY_MODELS, trainings, cache_dir=cache_dir)
    assert str(error.value).startswith("method 'ft_embed' trains the embedder on context labels")
    assert "only 1 of 4 training questions has a gold document (at least 2" in str(error.value)


def test_prepare_refuses_k_above_the_corpus_size(cache_dir):
    training = TINY_TRAINING.model_copy(update={"k": 100_000})
    with pytest.raises(ConfigError, match="training.k is 100000.*lower training.k"):
        prepare(TINY_DATA, TINY_MODELS, [("none", training)], cache_dir=cache_dir)
