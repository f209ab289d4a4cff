"""``ragsweep launch`` on partly labelled data: the embedder trains on the questions that have a
gold document, the stored record says how many, and too few labelled questions are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.search.test_cli import assert_one_line_error, ragsweep, write_spec
from tests.tiny import TINY_SPEC
from trainers import DataConfig, load_data

N_QUESTIONS, N_TRAIN, N_VALIDATION = 10, 6, 4


def _partly_labelled(folder: Path, n_labelled: int) -> tuple[dict, list[str]]:
    """A JSONL data spec whose first ``n_labelled`` training questions (and every validation
    question) have a gold document, and the ids of the labelled training questions."""
    questions, corpus = folder / "questions.jsonl", folder / "corpus.jsonl"
    documents = [
        {"id": f"d{i}", "title": f"T{i}", "text": f"the answer to {i} is {i}"}
        for i in range(N_QUESTIONS)
    ]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in documents))
    rows = [
        {"id": f"q{i}", "question": f"what is {i}?", "answers": [str(i)], "gold_doc_ids": []}
        for i in range(N_QUESTIONS)
    ]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = {
        "source": "jsonl",
        "path": str(questions),
        "corpus_path": str(corpus),
        "n_train": N_TRAIN,
        "n_validation": N_VALIDATION,
    }
    split = load_data(DataConfig(**data))  # the split depends on the question ids only
    labelled = [q.id for q in split.train[:n_labelled]]
    for i, row in enumerate(rows):
        if row["id"] in labelled or row["id"] in {q.id for q in split.validation}:
            row["gold_doc_ids"] = [f"d{i}"]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data, labelled


def _launch(tmp_path: Path, n_labelled: int, cache_dir: Path):
    data, labelled = _partly_labelled(tmp_path, n_labelled)
    spec = TINY_SPEC | {
        "name": "partial",
        "methods": ["ft_embed"],
        "data": data,
        "search": {"lr_embedder": [1e-3]},
        "concurrency": 1,
    }
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    result = ragsweep(
        "launch",
        str(write_spec(tmp_path, spec)),
        "--storage",
        storage,
        "--runs-dir",
        str(tmp_path / "runs"),
        cache_dir=cache_dir,
    )
    return result, storage, labelled


@pytest.mark.slow
def test_ft_embed_launch_on_partly_labelled_data_records_the_labelled_count(tmp_path, cache_dir):
    result, storage, labelled = _launch(tmp_path, 3, cache_dir)
    assert result.returncode == 0, result.stderr
    assert "0 failed" in result.stdout
    best = ragsweep(
        "best",
        "partial",
        "--method",
        "ft_embed",
        "--storage",
        storage,
        "--format",
        "json",
        cache_dir=cache_dir,
    )
    assert best.returncode == 0, best.stderr
    record = json.loads(best.stdout)["record"]
    assert record["labelled_train_questions"] == len(labelled) == 3
    assert record["has_context_labels"] is True
    assert len(record["split"]["train_ids"]) == N_TRAIN


def test_ft_embed_launch_with_one_labelled_question_is_refused_with_the_counts(tmp_path, cache_dir):
    result, _, _ = _launch(tmp_path, 1, cache_dir)
    assert_one_line_error(
        result,
        "'ft_embed'",
        f"only 1 of {N_TRAIN} training questions has a gold document",
        "gold_doc_ids",
    )
    assert not (tmp_path / "runs").exists()
