"""Each batched loss equals a per-document brute-force computation, and gradients go where told."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.losses import (
    answer_nll_loss,
    gather_answer_logprobs,
    mnrl_loss,
    rag_sequence_loss,
    rag_token_loss,
    retrieval_logprobs,
)

B, K, T, D, V = 4, 5, 6, 8, 11


@pytest.fixture
def rag_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    doc_scores = torch.randn(B, K, generator=generator)
    answer_logprobs = torch.log_softmax(torch.randn(B, K, T, V, generator=generator), -1)[..., 0]
    answer_mask = torch.ones(B, T)
    answer_mask[1, 4:] = 0  # answers of different lengths
    answer_mask[3, 2:] = 0
    return doc_scores, answer_logprobs, answer_mask


def _brute_force_rag(doc_scores, answer_logprobs, answer_mask, temperature, token_level):
    losses = []
    for b in range(B):
        length = int(answer_mask[b].sum())
        p_z = [math.exp(doc_scores[b, z] / temperature) for z in range(K)]
        p_z = [p / sum(p_z) for p in p_z]
        if token_level:
            log_p = sum(
                math.log(sum(p_z[z] * math.exp(answer_logprobs[b, z, i]) for z in range(K)))
                for i in range(length)
            )
        else:
            log_p = math.log(
                sum(
                    p_z[z] * math.exp(sum(answer_logprobs[b, z, i].item() for i in range(length)))
                    for z in range(K)
                )
            )
        losses.append(-log_p / length)
    return sum(losses) / B


@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_rag_sequence_equals_per_document_sum(rag_inputs, temperature):
    doc_scores, answer_logprobs, answer_mask = rag_inputs
    batched = rag_sequence_loss(
        retrieval_logprobs(doc_scores, temperature), answer_logprobs, answer_mask
    )
    expected = _brute_force_rag(
        doc_scores.double(), answer_logprobs.double(), answer_mask, temperature, token_level=False
    )
    assert batched.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_rag_token_equals_per_document_sum(rag_inputs, temperature):
    doc_scores, answer_logprobs, answer_mask = rag_inputs
    batched = rag_token_loss(
        retrieval_logprobs(doc_scores, temperature), answer_logprobs, answer_mask
    )
    expected = _brute_force_rag(
        doc_scores.double(), answer_logprobs.double(), answer_mask, temperature, token_level=True
    )
    assert batched.item() == pytest.approx(expected, abs=1e-5)


def test_rag_token_and_sequence_agree_with_one_document():
    # With k=1 both marginals reduce to the plain answer likelihood.
    generator = torch.Generator().manual_seed(1)
    answer_logprobs = -torch.rand(B, 1, T, generator=generator)
    answer_mask = torch.ones(B, T)
    doc_logprobs = torch.zeros(B, 1)
    token = rag_token_loss(doc_logprobs, answer_logprobs, answer_mask)
    sequence = rag_sequence_loss(doc_logprobs, answer_logprobs, answer_mask)
    assert token.item() == pytest.approx(sequence.item(), abs=1e-6)
    assert token.item() == pytest.approx(
        answer_nll_loss(answer_logprobs[:, 0], answer_mask).item(), abs=1e-6
    )


def test_answer_nll_ignores_padding():
    answer_logprobs = torch.tensor([[-1.0, -2.0, -50.0], [-3.0, -50.0, -50.0]])
    answer_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert answer_nll_loss(answer_logprobs, answer_mask).item() == pytest.approx(2.0)


def _brute_force_mnrl(questions, candidates, scale, masked):
    total = 0.0
    for i in range(len(questions)):
        columns = [j for j in range(len(candidates)) if not masked[i][j]]
        cosines = {
            j: torch.nn.functional.cosine_similarity(questions[i], candidates[j], dim=0).item()
            for j in columns
        }
        total += -math.log(
            math.exp(scale * cosines[i]) / sum(math.exp(scale * c) for c in cosines.values())
        )
    return total / len(questions)


def test_mnrl_equals_per_row_cross_entropy():
    generator = torch.Generator().manual_seed(2)
    questions, positives = (
        torch.randn(B, D, generator=generator),
        torch.randn(B, D, generator=generator),
    )
    expected = _brute_force_mnrl(questions, positives, 20.0, [[False] * B] * B)
    assert mnrl_loss(questions, positives, scale=20.0).item() == pytest.approx(expected, abs=1e-4)


def test_mnrl_with_hard_negatives_and_a_question_with_two_gold_documents():
    generator = torch.Generator().manual_seed(3)
    questions = torch.randn(B, D, generator=generator)
    candidates = torch.randn(B + 3, D, generator=generator)  # B positives, then 3 mined negatives
    questions[1] = questions[
        0
    ]  # rows 0 and 1: one two-hop question, paired with each gold document
    masked = torch.zeros(B, B + 3, dtype=torch.bool)
    masked[0, 1] = masked[1, 0] = True  # each row leaves out its question's other gold document
    batched = mnrl_loss(questions, candidates, scale=20.0, masked=masked)
    assert batched.item() == pytest.approx(
        _brute_force_mnrl(questions, candidates, 20.0, masked.tolist()), abs=1e-4
    )
    unmasked = mnrl_loss(questions, candidates, scale=20.0)
    assert batched.item() < unmasked.item()  # counting a gold document as negative only adds loss


def test_gradient_reaches_only_the_side_left_attached(rag_inputs):
    doc_scores, answer_logprobs, answer_mask = rag_inputs
    scores = doc_scores.clone().requires_grad_()
    logprobs = answer_logprobs.clone().requires_grad_()
    for loss_fn in (rag_token_loss, rag_sequence_loss):
        scores.grad = logprobs.grad = None
        loss_fn(retrieval_logprobs(scores.detach(), 0.05), logprobs, answer_mask).backward()
        assert scores.grad is None and logprobs.grad.abs().sum() > 0  # (c): G only
        logprobs.grad = None
        loss_fn(retrieval_logprobs(scores, 0.05), logprobs.detach(), answer_mask).backward()
        assert logprobs.grad is None and scores.grad.abs().sum() > 0  # (b): E only
        # Padding never receives a gradient.
        scores.grad = None
        loss_fn(retrieval_logprobs(scores, 0.05), logprobs, answer_mask).backward()
        assert logprobs.grad[3, :, 2:].abs().sum() == 0


def test_gather_answer_logprobs_reads_the_previous_position():
    logits = torch.randn(2, 4, V)  # T = 3 answer tokens, T + 1 positions kept
    answer_ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    gathered = gather_answer_logprobs(logits, answer_ids)
    expected = torch.log_softmax(logits, -1)[
        1, 1, 5
    ]  # row 1, token index 1 predicted by position 1
    assert gathered.shape == (2, 3)
    assert gathered[1, 1].item() == pytest.approx(expected.item(), abs=1e-6)
