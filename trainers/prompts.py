"""Prompts for the generator, and prompt+answer batches laid out for cheap answer scoring.

Every row is ``[left padding][prompt][answer][answer padding]`` with the answer in the last
``T`` positions, so a forward pass needs logits for only ``T + 1`` positions (``logits_to_keep``)
instead of the whole (rows, length, vocabulary) tensor. Position ids are counted from the first
real token, which makes a left-padded row score exactly like the same row unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from trainers.config import TrainingConfig
from trainers.corpus import Corpus, Document
from trainers.memory import PROMPT_OVERHEAD_TOKENS

if TYPE_CHECKING:
    from trainers.data import QARecord

__all__ = [
    "PromptBuilder",
    "AnswerBatch",
    "build_answer_batch",
    "left_padded",
    "position_ids",
    "prompt_fill",
    "prompt_lengths",
]

# Questions whose prompts prompt_fill measures: a few hundred milliseconds of tokenizing.
_FILL_QUESTIONS = 64
# A batch pads to its longest row, so its memory follows the long prompts, not the mean one: the
# 90th percentile stands for the longest of a batch of 8-16.
_FILL_PERCENTILE = 90


class PromptBuilder:
    """Fills the prompt template with a question and retrieved documents, each cut to a budget."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        *,
        max_doc_tokens: int,
        max_question_tokens: int,
    ) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self._max_doc_tokens = max_doc_tokens
        self._max_question_tokens = max_question_tokens
        self._passages: dict[str, str] = {}  # doc id -> "title: text", cut to max_doc_tokens

    @classmethod
    def for_training(
        cls, tokenizer: PreTrainedTokenizerBase, training: TrainingConfig
    ) -> PromptBuilder:
        """The builder with ``training``'s template and token caps."""
        return cls(
            tokenizer,
            training.prompt_template,
            max_doc_tokens=training.max_doc_tokens,
            max_question_tokens=training.max_question_tokens,
        )

    def prompt(self, question: str, documents: Sequence[Document]) -> str:
        """The template with the documents concatenated in retrieval order."""
        context = "\n".join(self._passage(document) for document in documents)
        return self._template.format(
            context=context, question=self._cut(question, self._max_question_tokens)
        )

    def n_tokens(self, text: str) -> int:
        """Tokens of ``text`` with the generator's tokenizer (no special tokens)."""
        return len(self._tokenizer(text, add_special_tokens=False).input_ids)

    def _passage(self, document: Document) -> str:
        if document.id not in self._passages:
            self._passages[document.id] = self._cut(
                f"{document.title}: {document.text}", self._max_doc_tokens
            )
        return self._passages[document.id]

    def _cut(self, text: str, max_tokens: int) -> str:
        token_ids = self._tokenizer(text, add_special_tokens=False).input_ids
        if len(token_ids) <= max_tokens:
            return text
        return cast(str, self._tokenizer.decode(token_ids[:max_tokens]))  # one sequence: one str


def prompt_lengths(
    questions: Sequence[QARecord],
    corpus: Corpus,
    prompts: PromptBuilder,
    training: TrainingConfig,
) -> list[int]:
    """Prompt + answer tokens of each question's evaluation prompt (the answer cut at
    ``max_answer_tokens``). Each prompt holds the question's gold passages, then the corpus's
    next ones up to k: retrieval picks other passages, of the same corpus's lengths, and this
    needs no index."""
    lengths = []
    for question in questions:
        rows = [int(row) for row in corpus.lookup(question.gold_doc_ids) if row >= 0]
        after = max(rows, default=-1) + 1
        rows += [row % len(corpus) for row in range(after, after + training.k)]
        prompt = prompts.prompt(question.question, corpus.documents(rows[: training.k]))
        answer = min(prompts.n_tokens(question.answers[0]), training.max_answer_tokens)
        lengths.append(prompts.n_tokens(prompt) + answer)
    return lengths


def prompt_fill(
    questions: Sequence[QARecord],
    corpus: Corpus,
    prompts: PromptBuilder,
    training: TrainingConfig,
) -> float | None:
    """How full these questions' prompts fill ``training``'s token caps, as
    :func:`trainers.memory.token_caps` takes it: (the 90th percentile of
    :func:`prompt_lengths` over the first 64 questions, less the template's overhead) /
    (question + k passages + answer caps); None without questions."""
    lengths = prompt_lengths(questions[:_FILL_QUESTIONS], corpus, prompts, training)
    if not lengths:
        return None
    caps = (
        training.max_question_tokens
        + training.k * training.max_doc_tokens
        + training.max_answer_tokens
    )
    long_prompt = float(np.percentile(lengths, _FILL_PERCENTILE))
    return round(max(long_prompt - PROMPT_OVERHEAD_TOKENS, 1.0) / caps, 3)


@dataclass(frozen=True)
class AnswerBatch:
    """Prompt+answer rows; the answer fills the last ``T`` positions of every row."""

    input_ids: torch.Tensor  # (R, L)
    attention_mask: torch.Tensor  # (R, L)
    position_ids: torch.Tensor  # (R, L)
    answer_ids: torch.Tensor  # (R, T)
    answer_mask: torch.Tensor  # (R, T)

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> AnswerBatch:
        return AnswerBatch(*(tensor.to(device) for tensor in self.__dict__.values()))


def build_answer_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_answer_tokens: int,
) -> AnswerBatch:
    """Tokenise prompts and answers (answer + end-of-sequence, so the model learns to stop)."""
    pad_id = tokenizer.pad_token_id
    prompt_ids = [tokenizer(prompt).input_ids for prompt in prompts]
    answer_ids = [
        (tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])[
            :max_answer_tokens
        ]
        for answer in answers
    ]
    answer_length = max(len(ids) for ids in answer_ids)
    padded_answers = [ids + [pad_id] * (answer_length - len(ids)) for ids in answer_ids]
    answer_mask = [[1] * len(ids) + [0] * (answer_length - len(ids)) for ids in answer_ids]
    input_ids, attention_mask = left_padded(
        [p + a for p, a in zip(prompt_ids, padded_answers, strict=True)],
        [[1] * len(p) + m for p, m in zip(prompt_ids, answer_mask, strict=True)],
        pad_id=pad_id,
    )
    return AnswerBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        answer_ids=torch.tensor(padded_answers),
        answer_mask=torch.tensor(answer_mask),
    )


def left_padded(
    rows: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], *, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows and their attention masks, padded on the left to one length."""
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (length - len(row)) + list(row) for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(mask)) + list(mask) for mask in masks])
    return input_ids, attention_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (padding gets 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
