"""One training phase: the whole step in one function, nanoGPT style.

AdamW with one parameter group per trained model (two learning rates), a linear schedule with
optional warm-up, gradient clipping, one shuffle per epoch derived from the trial seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from trainers.cost import PhaseCost, forward_flops, training_flops
from trainers.data import QARecord
from trainers.errors import TrainingError
from trainers.losses import (
    answer_nll_loss,
    mnrl_loss,
    rag_sequence_loss,
    rag_token_loss,
    retrieval_logprobs,
)
from trainers.memory import questions_per_forward, shape_of
from trainers.methods import Phase
from trainers.models import parameter_counts
from trainers.pipeline import Pipeline
from trainers.resume import (
    PhaseProgress,
    capture_random_state,
    restore_random_state,
    restore_weights,
    trained_weights,
)

__all__ = ["activation_checkpointing", "linear_lr_factor", "train_phase"]


class _Item(NamedTuple):
    """A training question; for MNRL also the gold document it is paired with and hard negatives."""

    record: QARecord
    doc_id: str | None = None
    negative_ids: tuple[str, ...] = ()


def linear_lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate: linear warm-up, then linear decay to 0 (the paper)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train_phase(
    phase: Phase,
    pipeline: Pipeline,
    records: Sequence[QARecord],
    *,
    lr_embedder: float | None,
    lr_generator: float | None,
    seed: int,
    cost: PhaseCost,
    after_step: Callable[[int, int, Callable[[], PhaseProgress]], None] | None = None,
    start: PhaseProgress | None = None,
) -> list[float]:
    """Train what ``phase`` trains on ``records`` for the configured epochs; returns step losses.

    An MNRL phase trains on the records with a gold document and leaves the others out.
    ``after_step(steps done, total steps, progress)`` is called after every optimizer step (a
    trial takes its rung signals and resume points there; ``progress()`` makes a
    :class:`PhaseProgress`); an error it raises stops the phase. With ``start``, the phase
    continues from that progress (a resumed trial) and goes on exactly as it did."""
    training = pipeline.training
    embedder, generator = pipeline.embedder, pipeline.generator.model
    groups: list[dict[str, Any]] = []  # AdamW parameter groups: params and lr
    if phase.trains_embedder:
        groups.append(
            {"params": [p for p in embedder.parameters() if p.requires_grad], "lr": lr_embedder}
        )
    if phase.trains_generator:
        groups.append(
            {"params": [p for p in generator.parameters() if p.requires_grad], "lr": lr_generator}
        )
    trained = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=training.weight_decay)
    items = _items(phase, pipeline, records, cost)
    steps_per_epoch = math.ceil(len(items) / _batch_size(phase, pipeline))
    total_steps = training.epochs * steps_per_epoch
    warmup_steps = int(training.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_lr_factor(step, total_steps, warmup_steps)
    )
    flops_per_token = _FlopCounter(phase, pipeline)
    per_forward = _questions_per_forward(phase, pipeline)
    cost.questions_per_forward = per_forward or 0

    losses: list[float] = []
    if start is not None:
        # After the items: MNRL mines its negatives with E as the phase started, as it did.
        restore_weights(pipeline, start.weights)
        optimizer.load_state_dict(start.optimizer)
        scheduler.load_state_dict(start.scheduler)
        restore_random_state(start.random_state)
        losses = list(start.losses)

    def progress() -> PhaseProgress:
        return PhaseProgress(
            step=len(losses),
            losses=list(losses),
            weights=trained_weights(pipeline, [phase]),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            random_state=capture_random_state(),
        )

    embedder.train(phase.trains_embedder)
    generator.train(phase.trains_generator)
    checkpointing = phase.trains_generator and training.gradient_checkpointing
    try:
        with activation_checkpointing(generator, checkpointing):
            for epoch in range(training.epochs):
                batches = _shuffled_batches(
                    items, _batch_size(phase, pipeline), f"{seed}/{phase.name}/{epoch}"
                )
                for step, batch in enumerate(batches, start=epoch * steps_per_epoch):
                    if step < len(losses):
                        continue  # done before the trial was resumed
                    batch_loss = 0.0
                    for chunk in _forward_chunks(batch, per_forward):
                        loss, embedder_tokens, generator_tokens = _loss(phase, pipeline, chunk)
                        if not torch.isfinite(loss):
                            raise TrainingError(
                                f"phase '{phase.name}' diverged: loss is {loss.item()} at step {cost.steps + 1}; "
                                "lower the learning rate"
                            )
                        # Chunk losses are means over their questions: weighted, they sum to the
                        # batch's mean, and so do their gradients.
                        (loss * len(chunk) / len(batch)).backward()
                        batch_loss += loss.item() * len(chunk) / len(batch)
                        cost.tokens += embedder_tokens + generator_tokens
                        cost.flops += flops_per_token.embedder(
                            embedder_tokens
                        ) + flops_per_token.generator(generator_tokens)
                    torch.nn.utils.clip_grad_norm_(trained, training.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(batch_loss)
                    cost.steps += 1
                    if after_step is not None:
                        after_step(len(losses), total_steps, progress)
    finally:
        embedder.eval()
        generator.eval()
    return losses


@contextmanager
def activation_checkpointing(generator: torch.nn.Module, on: bool) -> Iterator[None]:
    """Within the block, each decoder layer of ``generator`` keeps only its input for the
    backward pass and recomputes the rest there (transformers' gradient checkpointing)."""
    if not on:
        yield
        return
    # Non-reentrant: LoRA leaves the layer inputs without grad, and the reentrant variant would
    # then drop the adapters' gradients (torch.utils.checkpoint's documented caveat).
    generator.activation_checkpointing_enable({"use_reentrant": False})  # type: ignore[operator]
    try:
        yield
    finally:
        generator.activation_checkpointing_disable()  # type: ignore[operator]


def _loss(
    phase: Phase, pipeline: Pipeline, batch: Sequence[_Item]
) -> tuple[torch.Tensor, int, int]:
    """The phase's objective on one batch: (loss, embedder tokens, generator tokens)."""
    records = [item.record for item in batch]
    questions = [record.question for record in records]
    if phase.objective == "mnrl":
        question_vectors, question_tokens = pipeline.encode_questions(questions)
        candidate_ids = [_gold_id(item) for item in batch] + [
            n for item in batch for n in item.negative_ids
        ]
        positions = pipeline.index.corpus.positions(candidate_ids)
        candidates = pipeline.index.rows(positions, pipeline.device)  # (M, D)
        masked = torch.tensor(
            [
                [
                    doc_id in record.gold_doc_ids and column != row
                    for column, doc_id in enumerate(candidate_ids)
                ]
                for row, record in enumerate(records)
            ],
            device=pipeline.device,
        )
        loss = mnrl_loss(
            question_vectors, candidates, scale=pipeline.training.mnrl_scale, masked=masked
        )
        return loss, question_tokens, 0

    with torch.set_grad_enabled(phase.trains_embedder):
        retrieved = pipeline.retrieve(questions)
    answers = [record.answers[0] for record in records]
    documents = retrieved.documents(pipeline.index)
    if phase.objective == "nll_concat":
        prompts = [
            pipeline.prompts.prompt(q, docs) for q, docs in zip(questions, documents, strict=True)
        ]
        answer_logprobs, answer_mask, generator_tokens = pipeline.answer_logprobs(prompts, answers)
        return (
            answer_nll_loss(answer_logprobs, answer_mask),
            retrieved.question_tokens,
            generator_tokens,
        )

    # RAG-Token / RAG-Sequence: k single-document prompts per question, all in one forward.
    k = pipeline.training.k
    prompts = [
        pipeline.prompts.prompt(q, [doc])
        for q, docs in zip(questions, documents, strict=True)
        for doc in docs
    ]
    with torch.set_grad_enabled(phase.trains_generator):
        answer_logprobs, answer_mask, generator_tokens = pipeline.answer_logprobs(
            prompts, [answer for answer in answers for _ in range(k)]
        )
    answer_logprobs = answer_logprobs.view(len(records), k, -1)  # (B, k, T)
    answer_mask = answer_mask.view(len(records), k, -1)[
        :, 0
    ]  # (B, T): the same answer in every row
    doc_logprobs = retrieval_logprobs(
        pipeline.doc_scores(retrieved), pipeline.training.retrieval_temperature
    )
    rag_loss = rag_token_loss if phase.objective == "rag_token" else rag_sequence_loss
    return (
        rag_loss(doc_logprobs, answer_logprobs, answer_mask),
        retrieved.question_tokens,
        generator_tokens,
    )


def _gold_id(item: _Item) -> str:
    if item.doc_id is None:  # _items pairs every MNRL question with a gold document
        raise TrainingError(f"question {item.record.id} reached MNRL without a gold document")
    return item.doc_id


def _items(
    phase: Phase, pipeline: Pipeline, records: Sequence[QARecord], cost: PhaseCost
) -> list[_Item]:
    if phase.objective != "mnrl":
        return [_Item(record) for record in records]
    # MNRL trains on context labels: a question without a gold document has no positive, so it is
    # left out here (and mines no negatives); the generator phases still train on every question.
    labelled = [record for record in records if record.gold_doc_ids]
    negatives = _hard_negatives(pipeline, labelled, pipeline.training.mnrl_hard_negatives, cost)
    # A question with two gold documents (two-hop) is one item per gold document (sub-process (a)).
    return [
        _Item(record, doc_id, negatives[record.id])
        for record in labelled
        for doc_id in record.gold_doc_ids
    ]


def _hard_negatives(
    pipeline: Pipeline, records: Sequence[QARecord], per_question: int, cost: PhaseCost
) -> dict[str, tuple[str, ...]]:
    """The top-ranked non-gold documents of each question under E as the phase starts.

    In-batch negatives are mostly other entities, which a name match already tells apart; mined
    negatives add the confusable passages that retrieval actually gets wrong (as DPR does with BM25).
    """
    if per_question == 0:
        return {record.id: () for record in records}
    mined = {}
    n_embedder, _ = parameter_counts(pipeline.embedder)
    with torch.no_grad():
        for start in range(0, len(records), pipeline.training.eval_batch_size):
            batch = records[start : start + pipeline.training.eval_batch_size]
            depth = per_question + max(len(record.gold_doc_ids) for record in batch)
            retrieved = pipeline.retrieve([record.question for record in batch], k=depth)
            cost.tokens += retrieved.question_tokens
            cost.flops += forward_flops(
                parameter_counts(pipeline.embedder)[0], retrieved.question_tokens
            )
            for record, documents in zip(batch, retrieved.documents(pipeline.index), strict=True):
                non_gold = [doc.id for doc in documents if doc.id not in record.gold_doc_ids]
                mined[record.id] = tuple(non_gold[:per_question])
    return mined


def _batch_size(phase: Phase, pipeline: Pipeline) -> int:
    training = pipeline.training
    return (
        training.batch_size_embedder if phase.objective == "mnrl" else training.batch_size_generator
    )


def _questions_per_forward(phase: Phase, pipeline: Pipeline) -> int | None:
    """Questions per generator forward for RAG objectives: ``training.rag_questions_per_forward``,
    else as many as fit in ``training.activation_memory_mb``. None (the whole batch) for the other
    objectives: MNRL's in-batch negatives and nll_concat's token mean need the batch together."""
    if phase.objective not in ("rag_token", "rag_sequence"):
        return None
    training = pipeline.training
    if training.rag_questions_per_forward is not None:
        return training.rag_questions_per_forward
    return questions_per_forward(
        shape_of(pipeline.generator.model),
        training,
        bf16=pipeline.autocast_dtype is not None,
        grad=phase.trains_generator,
        checkpointing=phase.trains_generator and training.gradient_checkpointing,
    )


def _forward_chunks(batch: list[_Item], per_forward: int | None) -> list[list[_Item]]:
    if per_forward is None:
        return [batch]
    return [batch[start : start + per_forward] for start in range(0, len(batch), per_forward)]


def _shuffled_batches(items: Sequence[_Item], batch_size: int, seed: str) -> list[list[_Item]]:
    order = list(items)
    random.Random(seed).shuffle(order)  # a str seed hashes the same in every process
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class _FlopCounter:
    """Training FLOPs per model and token for one phase (see trainers.cost for the counting)."""

    def __init__(self, phase: Phase, pipeline: Pipeline) -> None:
        embedder_total, embedder_trainable = parameter_counts(pipeline.embedder)
        generator_total, generator_trainable = parameter_counts(pipeline.generator.model)
        self._embedder = (embedder_total, embedder_trainable if phase.trains_embedder else 0)
        self._generator = (generator_total, generator_trainable if phase.trains_generator else 0)

    def embedder(self, tokens: int) -> int:
        return training_flops(*self._embedder, tokens)

    def generator(self, tokens: int) -> int:
        return training_flops(*self._generator, tokens)
