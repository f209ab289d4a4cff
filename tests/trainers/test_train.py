"""Gradients reach exactly what each phase trains; batched scoring equals one row at a time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.tiny import TINY_TRAINING, tiny_config
from trainers.cost import CostMeter, PhaseCost
from trainers.index import DocumentIndex
from trainers.methods import Phase, method_phases
from trainers.train import (
    _Item,
    _items,
    _loss,
    activation_checkpointing,
    linear_lr_factor,
    train_phase,
)
from trainers.trial import build_pipeline


@pytest.fixture(scope="module")
def tiny_pipeline(cache_dir):
    data, pipeline = build_pipeline(
        tiny_config("rag_token"), cache_dir=cache_dir, meter=CostMeter(torch.device("cpu"))
    )
    return data, pipeline


def _has_grad(parameters) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)


ALL_PHASES = {
    phase
    for method in ("ft_embed", "ft_gen", "two_phase", "rag_token", "rag_sequence")
    for phase in method_phases(method, TINY_TRAINING)
}
ALL_PHASES |= set(
    method_phases("ft_gen", TINY_TRAINING.model_copy(update={"ft_gen_objective": "rag_token"}))
)


@pytest.mark.parametrize(
    "phase",
    sorted(ALL_PHASES, key=lambda p: (p.name, p.objective)),
    ids=lambda p: f"{p.name}-{p.objective}",
)
def test_gradients_reach_exactly_what_the_phase_trains(tiny_pipeline, phase: Phase):
    data, pipeline = tiny_pipeline
    embedder, generator = pipeline.embedder, pipeline.generator.model
    for parameter in [*embedder.parameters(), *generator.parameters()]:
        parameter.grad = None
    batch = [_Item(record, record.gold_doc_ids[0]) for record in data.train[:4]]
    loss, _, _ = _loss(phase, pipeline, batch)
    loss.backward()
    lora = [p for name, p in generator.named_parameters() if "lora_" in name]
    frozen_base = [p for name, p in generator.named_parameters() if "lora_" not in name]
    assert _has_grad(embedder.parameters()) == phase.trains_embedder
    assert _has_grad(lora) == phase.trains_generator
    assert not _has_grad(frozen_base)  # LoRA: the base weights never train


def test_the_embedder_phase_trains_on_exactly_the_labelled_questions(tiny_pipeline):
    data, pipeline = tiny_pipeline
    # Every third training question loses its gold documents: partly labelled data.
    records = [
        record if i % 3 else dataclasses.replace(record, gold_doc_ids=())
        for i, record in enumerate(data.train)
    ]
    labelled = [record for record in records if record.gold_doc_ids]
    assert 0 < len(labelled) < len(records)
    (mnrl,) = method_phases("ft_embed", TINY_TRAINING)
    # With mined negatives too: unlabelled questions mine none either.
    mining = dataclasses.replace(
        pipeline, training=TINY_TRAINING.model_copy(update={"mnrl_hard_negatives": 2})
    )
    cost, labelled_cost = PhaseCost(mnrl.name), PhaseCost(mnrl.name)
    items = _items(mnrl, mining, records, cost)
    assert [(item.record, item.doc_id) for item in items] == [
        (record, doc_id) for record in labelled for doc_id in record.gold_doc_ids
    ]
    assert all(len(item.negative_ids) == 2 for item in items)
    # Mining reads the labelled questions only: the same items at the same cost as without the rest.
    assert _items(mnrl, mining, labelled, labelled_cost) == items
    assert cost.tokens == labelled_cost.tokens > 0
    # The generator phases still train on every question.
    (nll,) = method_phases("ft_gen", TINY_TRAINING)
    assert [item.record for item in _items(nll, pipeline, records, PhaseCost(nll.name))] == records


def _rows_of_the_whole_matrix(
    index: DocumentIndex, positions: np.ndarray, device: torch.device
) -> torch.Tensor:
    """How scores took their rows before the memory map: the whole (N, D) matrix moved to the
    device as a tensor, then indexed."""
    whole = torch.from_numpy(np.array(index.doc_vectors)).to(device)  # (N, D)
    return whole[torch.as_tensor(np.asarray(positions))]


@pytest.mark.parametrize(
    "phase",
    [*method_phases("ft_embed", TINY_TRAINING), *method_phases("rag_token", TINY_TRAINING)],
    ids=lambda p: p.objective,
)
def test_gathered_rows_give_the_loss_and_gradients_of_the_whole_matrix(
    tiny_pipeline, phase: Phase, monkeypatch
):
    """MNRL scores its M candidates, RAG its B x k retrieved documents: only those rows are read
    from the memory-mapped vectors, and the loss and the question encoder's gradients are the
    ones the whole matrix gave (fp32)."""
    data, pipeline = tiny_pipeline
    assert isinstance(pipeline.index.doc_vectors, np.memmap)
    embedder, generator = pipeline.embedder, pipeline.generator.model
    corpus = pipeline.index.corpus
    negative = corpus.documents([len(corpus) - 1])[0].id  # M > B candidates for MNRL
    batch = [_Item(record, record.gold_doc_ids[0], (negative,)) for record in data.train[:4]]

    def scores_loss_and_embedder_gradients() -> tuple[torch.Tensor, ...]:
        for parameter in [*embedder.parameters(), *generator.parameters()]:
            parameter.grad = None
        with torch.no_grad():  # the top-k scores the RAG losses weigh documents by
            retrieved = pipeline.retrieve([item.record.question for item in batch])
            scores = pipeline.doc_scores(retrieved)
        loss, _, _ = _loss(phase, pipeline, batch)
        loss.backward()
        gradients = [p.grad.clone() for p in embedder.parameters() if p.grad is not None]
        return scores, loss.detach(), *gradients

    gathered = scores_loss_and_embedder_gradients()
    monkeypatch.setattr(DocumentIndex, "rows", _rows_of_the_whole_matrix)
    whole = scores_loss_and_embedder_gradients()

    assert len(gathered) == len(whole) > 2 and gathered[2].abs().sum() > 0
    for mine, theirs in zip(gathered, whole, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_batched_answer_scoring_equals_each_row_alone(tiny_pipeline):
    _, pipeline = tiny_pipeline
    prompts = ["short prompt", "a much longer prompt with many more words in it than the first"]
    answers = ["Dravenholt", "the Kessel Guild of Vasco"]
    with torch.no_grad():
        batched, mask, _ = pipeline.answer_logprobs(prompts, answers)
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            alone, alone_mask, _ = pipeline.answer_logprobs([prompt], [answer])
            length = int(alone_mask.sum())
            assert int(mask[row].sum()) == length
            torch.testing.assert_close(
                batched[row, :length], alone[0, :length], atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("method", ["rag_token", "rag_sequence"])
def test_questions_per_forward_accumulates_to_the_same_step(cache_dir, method):
    runs = []
    for per_forward in (TINY_TRAINING.batch_size_generator, 1):  # the whole batch, then one by one
        training = TINY_TRAINING.model_copy(update={"rag_questions_per_forward": per_forward})
        config = tiny_config(method, training=training)
        torch.manual_seed(0)  # the same LoRA initialisation in both runs
        data, pipeline = build_pipeline(
            config, cache_dir=cache_dir, meter=CostMeter(torch.device("cpu"))
        )
        # Dropout draws differ when the batch is split; without it the two runs are one sum.
        for model in (pipeline.embedder, pipeline.generator.model):
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        (phase,) = method_phases(method, training)  # joint: E and G through the RAG loss
        cost = PhaseCost(phase.name)
        losses = train_phase(
            phase, pipeline, data.train, lr_embedder=1e-3, lr_generator=1e-3, seed=0, cost=cost
        )
        trained = [
            p.detach().clone()
            for model in (pipeline.embedder, pipeline.generator.model)
            for p in model.parameters()
            if p.requires_grad
        ]
        runs.append((losses, trained, cost.tokens))
    (losses, trained, tokens), (chunked_losses, chunked_trained, chunked_tokens) = runs
    assert chunked_tokens == tokens
    torch.testing.assert_close(torch.tensor(chunked_losses), torch.tensor(losses))
    # Summed in another order, gradients differ in the last bits; Adam scales a near-zero
    # gradient up to a step of lr (1e-3) either way, so the weights agree to a fifth of that (with
    # checkpointing's recomputed forward, one weight in 30k differed by 1.1e-4).
    for chunked, whole in zip(chunked_trained, trained, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=0, atol=2e-4)


def test_activation_checkpointing_keeps_the_loss_and_gradients_and_saves_less(tiny_pipeline):
    data, pipeline = tiny_pipeline
    phase = Phase("joint", True, True, "rag_token")  # gradients through both models
    generator = pipeline.generator.model
    trained = [
        p for model in (pipeline.embedder, generator) for p in model.parameters() if p.requires_grad
    ]
    batch = [_Item(record) for record in data.train[:4]]
    runs = []
    generator.train()  # transformers checkpoints only in training mode
    try:
        for on in (False, True):
            for parameter in trained:
                parameter.grad = None
            saved: dict[int, int] = {}  # storage -> bytes kept for the backward pass

            def keep(tensor: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
                storage = tensor.untyped_storage()
                saved[storage.data_ptr()] = storage.nbytes()
                return tensor

            with activation_checkpointing(generator, on):
                with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                    loss, _, _ = _loss(phase, pipeline, batch)
                loss.backward()
            grads = [p.grad.clone() if p.grad is not None else None for p in trained]
            runs.append((loss.detach(), grads, sum(saved.values())))
    finally:
        generator.eval()
    (loss, grads, saved_bytes), (checkpointed_loss, checkpointed_grads, checkpointed_bytes) = runs
    assert checkpointed_bytes < saved_bytes  # the layers' intermediates were not kept
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-5, atol=1e-5)
    # The same parameters get gradients (all but the embedder's unused pooler), equal ones.
    assert [g is None for g in checkpointed_grads] == [g is None for g in grads]
    assert sum(g is not None for g in grads) >= len(trained) - 2
    for checkpointed, whole in zip(checkpointed_grads, grads, strict=True):
        if whole is not None:
            torch.testing.assert_close(checkpointed, whole, rtol=1e-5, atol=1e-5)


def test_linear_schedule_warms_up_then_decays_to_zero():
    factors = [linear_lr_factor(step, total_steps=10, warmup_steps=2) for step in range(11)]
    assert factors[0] == 0.5 and factors[1] == 1.0
    assert factors[2] == 1.0 and factors[-1] == 0.0
    assert all(a >= b for a, b in zip(factors[1:-1], factors[2:], strict=True))
