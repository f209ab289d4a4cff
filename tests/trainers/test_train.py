"""Gradients reach exactly what each phase trains; batched scoring equals one row at a time."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import TINY_TRAINING, tiny_config
from trainers.cost import CostMeter
from trainers.methods import Phase, method_phases
from trainers.train import _Item, _loss, linear_lr_factor
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


def test_linear_schedule_warms_up_then_decays_to_zero():
    factors = [linear_lr_factor(step, total_steps=10, warmup_steps=2) for step in range(11)]
    assert factors[0] == 0.5 and factors[1] == 1.0
    assert factors[2] == 1.0 and factors[-1] == 0.0
    assert all(a >= b for a, b in zip(factors[1:-1], factors[2:], strict=True))
