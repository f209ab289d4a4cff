"""The four training objectives, each batched over the k retrieved documents.

Shapes are written as comments; ``B`` is the batch, ``k`` the retrieved documents per question,
``T`` the answer length in generator tokens, ``D`` the embedding size. What the gradient reaches is
decided by the caller: pass detached ``doc_scores`` to train only G, or ``answer_logprobs``
computed under ``torch.no_grad()`` to train only E.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "mnrl_loss",
    "answer_nll_loss",
    "rag_sequence_loss",
    "rag_token_loss",
    "retrieval_logprobs",
    "gather_answer_logprobs",
]


def mnrl_loss(
    question_vectors: torch.Tensor,  # (B, D), with grad: the embedder being trained
    candidate_vectors: torch.Tensor,  # (M, D), frozen index vectors: B positives, then negatives
    *,
    scale: float,
    masked: torch.Tensor | None = None,  # (B, M) bool: another gold document of row i's question
) -> torch.Tensor:
    """Multiple-negatives ranking loss: cross-entropy of scaled cosines, row i's positive in column i.

    Every other candidate is a negative: the other rows' positives (in-batch negatives) and any
    mined hard negatives appended after them. A question with several gold documents appears once
    per gold document; ``masked`` removes its other gold documents instead of counting them as
    negatives.
    """
    scores = (
        scale * F.normalize(question_vectors, dim=-1) @ F.normalize(candidate_vectors, dim=-1).T
    )
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    positives = torch.arange(len(scores), device=scores.device)
    return F.cross_entropy(scores, positives)


def answer_nll_loss(
    answer_logprobs: torch.Tensor,  # (B, T) log p(y_i | prompt, y_<i)
    answer_mask: torch.Tensor,  # (B, T) 1 for real answer tokens, 0 for padding
) -> torch.Tensor:
    """Mean negative log-likelihood per answer token (the ``nll_concat`` objective)."""
    mask = answer_mask.to(answer_logprobs.dtype)
    return -(answer_logprobs * mask).sum() / mask.sum()


def retrieval_logprobs(doc_scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(z|x): softmax of the top-k retrieval scores (B, k) at a temperature."""
    return torch.log_softmax(doc_scores / temperature, dim=-1)


def rag_sequence_loss(
    doc_logprobs: torch.Tensor,  # (B, k) log p(z|x)
    answer_logprobs: torch.Tensor,  # (B, k, T) log p(y_i | x, z, y_<i)
    answer_mask: torch.Tensor,  # (B, T)
) -> torch.Tensor:
    """-log p(y|x) with log p(y|x) = logsumexp_z [log p(z|x) + sum_i log p(y_i|x,z,y_<i)].

    Divided by the answer length so that one learning rate means the same across objectives.
    """
    mask = answer_mask.to(answer_logprobs.dtype)
    sequence_logprobs = (answer_logprobs * mask[:, None, :]).sum(-1)  # (B, k)
    marginal = torch.logsumexp(doc_logprobs + sequence_logprobs, dim=-1)  # (B,)
    return -(marginal / mask.sum(-1)).mean()


def rag_token_loss(
    doc_logprobs: torch.Tensor,  # (B, k) log p(z|x)
    answer_logprobs: torch.Tensor,  # (B, k, T)
    answer_mask: torch.Tensor,  # (B, T)
) -> torch.Tensor:
    """-log p(y|x) with log p(y|x) = sum_i logsumexp_z [log p(z|x) + log p(y_i|x,z,y_<i)].

    Divided by the answer length, as :func:`rag_sequence_loss`.
    """
    mask = answer_mask.to(answer_logprobs.dtype)
    token_marginals = torch.logsumexp(doc_logprobs[:, :, None] + answer_logprobs, dim=1)  # (B, T)
    return -((token_marginals * mask).sum(-1) / mask.sum(-1)).mean()


def gather_answer_logprobs(
    logits: torch.Tensor,  # (R, T + 1, V): the last T + 1 positions of each prompt+answer row
    answer_ids: torch.Tensor,  # (R, T): the answer tokens, which fill the last T positions
) -> torch.Tensor:
    """log p(y_i | prompt, y_<i) for each answer token: position i - 1 predicts token i. (R, T)"""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (R, T, V)
    return logprobs.gather(-1, answer_ids[:, :, None]).squeeze(-1)
