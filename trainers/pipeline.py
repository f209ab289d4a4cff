"""The RAG pipeline of one trial: embedder E, frozen index, generator G, and the passes over them.

Each function does one pass and reports the tokens it processed, so the caller can meter cost.
Whether a pass carries gradients is the caller's choice (``torch.no_grad()`` around it or not).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from trainers.config import TrainingConfig
from trainers.corpus import Document
from trainers.index import DocumentIndex
from trainers.losses import gather_answer_logprobs
from trainers.models import Generator
from trainers.prompts import PromptBuilder, build_answer_batch, left_padded

__all__ = ["Pipeline", "Retrieved"]


@dataclass(frozen=True)
class Retrieved:
    """Top-k documents of a batch of questions."""

    positions: np.ndarray  # (B, k) rows of the index
    question_vectors: torch.Tensor  # (B, D), with grad when E is being trained
    question_tokens: int

    def documents(self, index: DocumentIndex) -> list[list[Document]]:
        """The top-k passages of each question, read from the corpus."""
        return index.documents(self.positions)


@dataclass
class Pipeline:
    """E, the frozen index over E's baseline vectors, G and the prompt builder, on one device."""

    embedder: SentenceTransformer
    generator: Generator
    index: DocumentIndex
    prompts: PromptBuilder
    training: TrainingConfig
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 autocast where the device supports it, else None

    def autocast(self) -> AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def encode_questions(self, questions: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Question vectors from E (B, D), and the question tokens encoded."""
        self.embedder.max_seq_length = self.training.max_question_tokens
        features = self.embedder.preprocess(list(questions))
        features = {
            name: value.to(self.device) if isinstance(value, torch.Tensor) else value
            for name, value in features.items()
        }
        with self.autocast():
            question_vectors = self.embedder(features)["sentence_embedding"].float()
        return question_vectors, int(features["attention_mask"].sum())

    def retrieve(self, questions: Sequence[str], *, k: int | None = None) -> Retrieved:
        """Encode questions with E and search the top-k (default training.k); scores can carry a
        gradient to E."""
        question_vectors, question_tokens = self.encode_questions(questions)
        _, positions = self.index.search(
            question_vectors.detach().cpu().numpy(), k or self.training.k
        )
        return Retrieved(positions, question_vectors, question_tokens)

    def doc_scores(self, retrieved: Retrieved) -> torch.Tensor:
        """s(q(x), d(z)) for the top-k documents, against the frozen document vectors. (B, k)"""
        doc_vectors = self.index.rows(retrieved.positions, self.device)  # (B, k, D)
        return torch.einsum("bd,bkd->bk", retrieved.question_vectors, doc_vectors)

    def answer_logprobs(
        self, prompts: Sequence[str], answers: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """log p(answer token | prompt, earlier answer tokens) for every row, in one forward.

        Returns (logprobs (R, T), answer_mask (R, T), tokens processed).
        """
        batch = build_answer_batch(
            self.generator.tokenizer,
            prompts,
            answers,
            max_answer_tokens=self.training.max_answer_tokens,
        ).to(self.device)
        answer_length = batch.answer_ids.size(1)
        with self.autocast():
            logits = self.generator.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                logits_to_keep=answer_length + 1,
            ).logits  # (R, T + 1, V)
        return gather_answer_logprobs(logits, batch.answer_ids), batch.answer_mask, batch.n_tokens

    @torch.no_grad()
    def generate(self, prompts: Sequence[str]) -> tuple[list[str], int]:
        """Greedy continuations of the prompts, and the tokens processed (prompt + generated)."""
        tokenizer = self.generator.tokenizer
        prompt_ids = [tokenizer(prompt).input_ids for prompt in prompts]
        input_ids, attention_mask = left_padded(
            prompt_ids, [[1] * len(ids) for ids in prompt_ids], pad_id=tokenizer.pad_token_id
        )
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with self.autocast():
            # transformers' GenerationMixin.generate; torch types Module attributes as Tensor | Module.
            output_ids = self.generator.model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=self.training.max_new_tokens,
                # Logits of the last position only: transformers does this itself for plain
                # models, but cannot see the argument through peft's wrapper and computed the
                # prompt's whole (R, L, V) logits (SmolLM2, 16 prompts: ~0.9 GB in fp32).
                logits_to_keep=1,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        continuations = output_ids[:, input_ids.size(1) :]
        generated = (continuations != tokenizer.pad_token_id).sum().item()
        texts = tokenizer.batch_decode(continuations, skip_special_tokens=True)
        return texts, int(attention_mask.sum()) + int(generated)
