"""Preflight for a study: check the data once, before any trial, and warm the caches trials read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainers.checks import require_context_labels, resolve_device
from trainers.config import DataConfig, ModelsConfig, TrainingConfig, VectorDtype
from trainers.data import load_data
from trainers.errors import ConfigError
from trainers.methods import needs_context_labels

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from trainers.corpus import Corpus

# Encodes (embedder, corpus, max length, vector dtype) into the vectors cache before the index is
# built, where it has a faster way than this process (a cluster); it may leave it to build_index.
Encoder = Callable[["SentenceTransformer", "Corpus", int, VectorDtype], object]

__all__ = ["Encoder", "prepare"]


def prepare(
    data: DataConfig,
    models: ModelsConfig,
    trainings: Sequence[tuple[str, TrainingConfig]],
    *,
    cache_dir: Path,
    encoder: Encoder | None = None,
    convert_generator: bool = True,
) -> float | None:
    """Check ``data`` against every (method, training) of a study, convert the built-in models and
    build the frozen index in ``cache_dir`` once, before trials race to do it: a mistake found
    here fails the study as it starts, not each of its trials. ``encoder`` encodes the corpus
    first where the vectors are not cached; ``convert_generator`` False leaves the generator alone
    (an index job needs only the embedder).

    Returns how full the data's prompts fill the first training's token caps
    (:func:`trainers.prompts.prompt_fill`, what each trial measures for itself), for the memory
    forecast; None where the generator is not loaded here (QLoRA, or ``convert_generator`` False).
    """
    for device in dict.fromkeys(training.device for _, training in trainings):
        resolve_device(device)
    rag_data = load_data(data)
    for k in dict.fromkeys(training.k for _, training in trainings):
        if k > len(rag_data.corpus):
            raise ConfigError(
                f"training.k is {k} but the corpus has only {len(rag_data.corpus)} documents; "
                "lower training.k"
            )
    for method, training in trainings:
        if needs_context_labels(method, training):
            require_context_labels(method, rag_data)
    # The model libraries (seconds to import) load only once the data has passed, so that a
    # mistake in it is reported at once.
    from trainers.index import build_index
    from trainers.models import load_embedder, load_generator
    from trainers.prompts import PromptBuilder, prompt_fill

    # Conversions and vectors do not depend on the device that computes them: the CPU always has
    # room, and a GPU is left to the trials.
    cpu = torch.device("cpu")
    embedder = load_embedder(models.embedder, cache_dir=cache_dir, device=cpu)
    indexes = dict.fromkeys(
        (training.embedder_max_length, training.index) for _, training in trainings
    )
    for max_length, index in indexes:
        if encoder is not None:
            encoder(embedder, rag_data.corpus, max_length, index.vector_dtype)
        build_index(
            embedder, rag_data.corpus, cache_dir=cache_dir, max_length=max_length, index=index
        )
    # A QLoRA generator is a hub model too large to load in full here; each trial loads it 4-bit.
    if not convert_generator or models.generator_finetune == "qlora":
        return None
    generator = load_generator(models.generator, cache_dir=cache_dir, device=cpu, finetune="full")
    training = trainings[0][1]  # stages differ in objectives, not in token caps
    prompts = PromptBuilder.for_training(generator.tokenizer, training)
    return prompt_fill(rag_data.train, rag_data.corpus, prompts, training)
