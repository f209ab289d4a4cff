"""End-to-end evaluation: retrieve, generate greedily, and score EM, F1 and Recall@k.

EM and F1 follow the SQuAD v1.1 evaluation script: answers are lower-cased, stripped of
punctuation, of the articles a/an/the and of extra whitespace; the score of a prediction is the
maximum over the gold aliases.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from trainers.corpus import Document
from trainers.cost import PhaseCost, forward_flops
from trainers.data import QARecord
from trainers.models import parameter_counts
from trainers.pipeline import Pipeline
from trainers.results import QuestionResult

__all__ = [
    "Answered",
    "Evaluation",
    "gold_found",
    "evaluate_pipeline",
    "normalize_answer",
    "exact_match",
    "f1_score",
    "recall_at_k",
    "answer_text",
    "answer_logprobs",
    "gold_reciprocal_ranks",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold alias, else 0.0."""
    return max(
        float(normalize_answer(prediction) == normalize_answer(answer)) for answer in answers
    )


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 between prediction and the best-matching gold alias."""
    return max(
        _f1(normalize_answer(prediction).split(), normalize_answer(answer).split())
        for answer in answers
    )


def _f1(predicted_tokens: list[str], gold_tokens: list[str]) -> float:
    common = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def recall_at_k(
    retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]]
) -> float | None:
    """Mean over labelled questions of |gold ∩ top-k| / |gold| (:func:`gold_found`).

    Questions without context labels are left out; None when none has any.
    """
    return _mean(
        [
            gold_found(retrieved, gold)
            for retrieved, gold in zip(retrieved_ids, gold_ids, strict=True)
        ]
    )


def gold_found(retrieved_ids: Sequence[str], gold_ids: Sequence[str]) -> float | None:
    """|gold ∩ retrieved| / |gold| for one question, None without context labels: with several
    gold documents (two-hop questions) retrieving one of two counts 0.5."""
    if not gold_ids:
        return None
    return len(set(gold_ids) & set(retrieved_ids)) / len(set(gold_ids))


def answer_text(generated: str) -> str:
    """The answer a generation gives: the text before any new ``###`` section, on one line."""
    return " ".join(generated.split("###", 1)[0].split())


@dataclass
class Answered:
    """The questions an evaluation has answered so far, in order: the answers generated and the
    passages each read. Enough to continue the evaluation in a new process."""

    predictions: list[str | None] = field(default_factory=list)
    retrieved: list[list[str]] = field(default_factory=list)  # document ids, best first


def evaluate_pipeline(
    pipeline: Pipeline,
    records: Sequence[QARecord],
    cost: PhaseCost,
    *,
    start: Answered | None = None,
    after_batch: Callable[[Answered, bool], None] | None = None,
) -> Evaluation:
    """Retrieve top-k with E, generate greedily from the concatenated prompt, and score; with
    ``training.evaluate`` "retrieval", retrieve and score Recall@k only.

    With ``start``, the questions it answered are taken as answered (a resumed trial) and the
    rest are answered in the same batches as before. ``after_batch(answered so far, whether all
    are)`` is called after each batch of generation (a trial saves resume points there)."""
    if pipeline.training.evaluate == "retrieval":
        with torch.no_grad():
            retrieved = [
                [document.id for document in documents]
                for _, batch_documents in _retrieved_batches(pipeline, records, cost)
                for documents in batch_documents
            ]
        return _scored(records, [None] * len(records), retrieved)
    n_generator, _ = parameter_counts(pipeline.generator.model)
    answered = Answered(list(start.predictions), list(start.retrieved)) if start else Answered()
    # Resume points are saved after whole batches: the rest starts at a batch boundary, so its
    # batches (and their padding) are the ones an uninterrupted evaluation generates.
    remaining = records[len(answered.predictions) :]
    with torch.no_grad():
        for _, documents, prompts in _prompted_batches(pipeline, remaining, cost):
            generations, generator_tokens = pipeline.generate(prompts)
            answered.predictions += [answer_text(text) for text in generations]
            answered.retrieved += [[document.id for document in docs] for docs in documents]
            cost.tokens += generator_tokens
            cost.flops += forward_flops(n_generator, generator_tokens)
            cost.steps += 1
            if after_batch is not None:
                after_batch(answered, len(answered.predictions) == len(records))
    return _scored(records, answered.predictions, answered.retrieved)


def _scored(
    records: Sequence[QARecord],
    predictions: Sequence[str | None],
    retrieved: Sequence[Sequence[str]],
) -> Evaluation:
    """Each question's result and their means; EM and F1 None where nothing was generated."""
    questions = [
        QuestionResult(
            id=record.id,
            prediction=prediction,
            em=None if prediction is None else exact_match(prediction, record.answers),
            f1=None if prediction is None else f1_score(prediction, record.answers),
            recall=gold_found(doc_ids, record.gold_doc_ids),
            retrieved=tuple(doc_ids),
        )
        for record, prediction, doc_ids in zip(records, predictions, retrieved, strict=True)
    ]
    return Evaluation(
        em=_mean([question.em for question in questions]),
        f1=_mean([question.f1 for question in questions]),
        recall_at_k=_mean([question.recall for question in questions]),  # as recall_at_k
        predictions=[prediction for prediction in predictions if prediction is not None],
        questions=questions,
    )


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are there; None when none is."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def answer_logprobs(
    pipeline: Pipeline, records: Sequence[QARecord], cost: PhaseCost
) -> list[float]:
    """For each of ``records``, the gold answer's mean log-probability per token given the prompt
    evaluation generates from (the top-k passages concatenated): how well the pipeline as it
    stands would answer it, from one forward pass and no generation."""
    n_generator, _ = parameter_counts(pipeline.generator.model)
    per_question: list[float] = []
    with _eval_mode(pipeline.embedder, pipeline.generator.model), torch.no_grad():
        for batch, _, prompts in _prompted_batches(pipeline, records, cost):
            answers = [record.answers[0] for record in batch]
            logprobs, mask, generator_tokens = pipeline.answer_logprobs(prompts, answers)
            mask = mask.to(logprobs.dtype)
            per_question += ((logprobs * mask).sum(dim=1) / mask.sum(dim=1)).tolist()
            cost.tokens += generator_tokens
            cost.flops += forward_flops(n_generator, generator_tokens)
    return per_question


def gold_reciprocal_ranks(
    pipeline: Pipeline, records: Sequence[QARecord], cost: PhaseCost, *, candidates: int = 100
) -> list[float]:
    """For each of ``records`` (all with gold documents), the mean over its gold documents of
    1 / rank in the question's retrieval, ranked as evaluation retrieves (0 beyond the top
    ``candidates``): how well the embedder as it stands ranks the passages evaluation would
    read, without the generator (a question encoding and one index search each). A rank, not
    the passages' softmax probability: MNRL sharpens the scores (on PopQA 1e-4 raised the gold
    passages' log-probability from -5.4 to -4.0 in 4 steps) while their ranks, what evaluation
    reads, got no better (Recall@5 fell by a point)."""
    n_embedder, _ = parameter_counts(pipeline.embedder)
    per_question: list[float] = []
    batch_size = pipeline.training.eval_batch_size
    depth = min(candidates, len(pipeline.index.corpus))
    with _eval_mode(pipeline.embedder), torch.no_grad():
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            retrieved = pipeline.retrieve([record.question for record in batch], k=depth)
            cost.tokens += retrieved.question_tokens
            cost.flops += forward_flops(n_embedder, retrieved.question_tokens)
            for record, documents in zip(batch, retrieved.documents(pipeline.index), strict=True):
                ranks = {document.id: rank for rank, document in enumerate(documents, 1)}
                per_question.append(
                    sum(1 / ranks[gold] if gold in ranks else 0.0 for gold in record.gold_doc_ids)
                    / len(record.gold_doc_ids)
                )
    return per_question


@contextmanager
def _eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """``models`` in eval mode, then back in the modes they had: a signal taken mid-training draws
    nothing from dropout, so training goes on exactly as it would have without it."""
    modes = [(model, model.training) for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, training in modes:
            model.train(training)


def _retrieved_batches(
    pipeline: Pipeline, records: Sequence[QARecord], cost: PhaseCost
) -> Iterator[tuple[Sequence[QARecord], list[list[Document]]]]:
    """``records`` in evaluation batches, each with its top-k documents; the retrieval is
    metered to ``cost``."""
    n_embedder, _ = parameter_counts(pipeline.embedder)
    batch_size = pipeline.training.eval_batch_size
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        retrieved = pipeline.retrieve([record.question for record in batch])
        cost.tokens += retrieved.question_tokens
        cost.flops += forward_flops(n_embedder, retrieved.question_tokens)
        yield batch, retrieved.documents(pipeline.index)


def _prompted_batches(
    pipeline: Pipeline, records: Sequence[QARecord], cost: PhaseCost
) -> Iterator[tuple[Sequence[QARecord], list[list[Document]], list[str]]]:
    """:func:`_retrieved_batches` with the prompts evaluation reads (the passages concatenated)."""
    for batch, documents in _retrieved_batches(pipeline, records, cost):
        prompts = [
            pipeline.prompts.prompt(record.question, docs)
            for record, docs in zip(batch, documents, strict=True)
        ]
        yield batch, documents, prompts


@dataclass(frozen=True)
class Evaluation:
    """Validation scores: EM and F1 in [0, 1] (None where retrieval alone was scored), Recall@k
    (None without context labels), and each question's."""

    em: float | None
    f1: float | None
    recall_at_k: float | None
    predictions: list[str]  # empty where retrieval alone was scored
    questions: list[QuestionResult]
