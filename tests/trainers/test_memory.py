"""The memory forecast: what a forward holds grows with its rows, shrinks with checkpointing, and
the questions per RAG forward follow the budget."""

from __future__ import annotations

import pytest

from trainers.config import TrainingConfig
from trainers.memory import (
    MiB,
    ModelShape,
    forward_activation_bytes,
    questions_per_forward,
    token_caps,
)

# SmolLM2-135M's shape (the demo's generator).
SMOLLM2 = ModelShape(
    134_515_008, layers=30, hidden=576, intermediate=1536, kv_hidden=192, vocab=49_152
)


def _activations(rows: int, **flags: bool) -> float:
    settings = {"bf16": False, "grad": True, "checkpointing": True} | flags
    return forward_activation_bytes(
        SMOLLM2, rows=rows, tokens_per_row=120, answer_tokens=8, **settings
    )


def test_activations_grow_with_rows_and_shrink_with_checkpointing_bf16_and_without_grad():
    assert _activations(40) > _activations(10) > 0
    assert _activations(40, checkpointing=False) > 5 * _activations(40)
    assert _activations(40, bf16=True) < _activations(40)
    assert _activations(40, grad=False) < _activations(40, checkpointing=False)


@pytest.mark.parametrize("budget_mb", [1, 256, 1024, 4096, 1_000_000])
def test_questions_per_forward_fit_the_budget_within_the_batch(budget_mb):
    training = TrainingConfig(activation_memory_mb=budget_mb, batch_size_generator=8, k=5)
    chosen = questions_per_forward(SMOLLM2, training, bf16=False, grad=True, checkpointing=True)
    assert 1 <= chosen <= 8
    caps = token_caps(training)

    def forward_bytes(questions: int) -> float:
        return forward_activation_bytes(
            SMOLLM2,
            rows=questions * training.k,
            tokens_per_row=caps.single_prompt,
            answer_tokens=caps.answer,
            bf16=False,
            grad=True,
            checkpointing=True,
        )

    if chosen > 1:
        assert forward_bytes(chosen) <= budget_mb * MiB
    if chosen < 8:  # the next question would not have fit
        assert forward_bytes(chosen + 1) > budget_mb * MiB


def test_a_larger_budget_never_runs_fewer_questions_and_checkpointing_runs_more():
    def chosen(budget_mb: int, checkpointing: bool) -> int:
        training = TrainingConfig(activation_memory_mb=budget_mb, batch_size_generator=32)
        return questions_per_forward(
            SMOLLM2, training, bf16=False, grad=True, checkpointing=checkpointing
        )

    budgets = [64, 256, 1024, 4096, 16384]
    counts = [chosen(budget, True) for budget in budgets]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    assert chosen(1024, False) < chosen(1024, True)


def test_retrieval_only_evaluation_forecasts_the_weights_and_no_generation():
    from trainers.memory import _RUNTIME_BYTES, trial_memory
    from trainers.methods import method_phases

    minilm = ModelShape(22_713_216, layers=6, hidden=384, intermediate=1536, kv_hidden=384, vocab=0)
    weights = (minilm.params + SMOLLM2.params) * 4
    answers, retrieval = (
        TrainingConfig(evaluate=mode, prompt_fill=0.8) for mode in ("answers", "retrieval")
    )

    def peak(method: str, training: TrainingConfig) -> float:
        phases = method_phases(method, training)
        return trial_memory(
            phases, embedder=minilm, generator=SMOLLM2, generator_trainable=0,
            training=training, bf16=False, on_gpu=False,
        ).host_bytes  # fmt: skip

    # `none` trains nothing: retrieving alone holds the runtime and the weights, nothing more.
    assert peak("none", retrieval) == _RUNTIME_BYTES + weights < peak("none", answers)
    # ft_embed's peak is then its training step, which generating answers outweighed.
    assert peak("none", retrieval) < peak("ft_embed", retrieval) < peak("ft_embed", answers)
