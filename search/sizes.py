"""The sizes forecasts are computed from, known without loading anything: each built-in and
listed model's shape (parameters, LoRA parameters per rank, layers and widths) and embedding
dimension, the questions in the hub splits trainers.data reads and the passages of hub corpora too
large to count in a plan. A model or split not listed is unknown, never guessed."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

from trainers import ModelShape

if TYPE_CHECKING:
    from search.spec import StudySpec
    from trainers import DataConfig

__all__ = [
    "ModelShapes",
    "embedder_shape",
    "embedding_dimension",
    "hub_passages",
    "hub_questions",
    "model_shapes",
    "unknown_models",
]


class ModelShapes(NamedTuple):
    """The shapes of a spec's two models."""

    embedder: ModelShape
    generator: ModelShape


# LoRA per rank = layers x sum(in + out) over q, k, v, o, gate, up, down (peft's "all-linear").
_LLAMA_8B_LORA = 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
_SMOLLM2 = ModelShape(
    134_515_008,
    lora_params_per_rank=30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * 2112),
    layers=30,
    hidden=576,
    intermediate=1536,
    kv_hidden=192,
    vocab=49_152,
)
_LLAMA_3_8B = ModelShape(
    8_030_261_248,
    lora_params_per_rank=_LLAMA_8B_LORA,
    layers=32,
    hidden=4096,
    intermediate=14336,
    kv_hidden=1024,
    vocab=128_256,
)
_MINILM = ModelShape(22_713_216)
_EMBEDDERS: dict[str, ModelShape] = {
    "minilm": _MINILM,
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM,
    "sentence-transformers/all-mpnet-base-v2": ModelShape(109_486_464),
    "tiny": ModelShape(153_536),  # trainers._tiny_models: 2-layer BERT, hidden 64
}
_GENERATORS: dict[str, ModelShape] = {
    "smollm2-135m": _SMOLLM2,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2,
    "tiny": ModelShape(  # trainers._tiny_models: 2-layer Llama, hidden 64
        106_816,
        lora_params_per_rank=2 * (2 * 128 + 2 * 96 + 3 * 192),
        layers=2,
        hidden=64,
        intermediate=128,
        kv_hidden=32,
        vocab=512,
    ),
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA_3_8B,
    # The same decoder layers as Llama-3-8B; a smaller vocabulary.
    "mistralai/Mistral-7B-Instruct-v0.2": replace(_LLAMA_3_8B, params=7_241_732_096, vocab=32_000),
}
# Questions in the hub splits trainers.data reads by default (PopQA has only "test"), for
# data.n_train: null ("all that remain after validation").
_HUB_QUESTIONS: dict[tuple[str, str], int] = {
    ("hotpotqa/hotpot_qa", "train"): 90_447,
    ("hotpotqa/hotpot_qa", "validation"): 7_405,
    ("hotpot_qa", "train"): 90_447,
    ("hotpot_qa", "validation"): 7_405,
    ("akariasai/PopQA", "test"): 14_267,
}
_DEFAULT_HUB_SPLITS = {"popqa": "test", "hotpotqa": "validation"}  # as trainers.data
# Output dimension of each embedder (keyed as _EMBEDDERS).
_DIMENSIONS: dict[str, int] = {
    "minilm": 384,
    "sentence-transformers/all-MiniLM-L6-v2": 384,
    "sentence-transformers/all-mpnet-base-v2": 768,
    "tiny": 64,  # trainers._tiny_models: hidden 64, mean pooling
}
# Hub corpora too large to count in a plan, by (hub name, split), for when they are not yet in
# the datasets cache. MedRAG/wikipedia: its dataset card (29,913,202 snippets, ~162 tokens each).
_HUB_PASSAGES: dict[tuple[str, str], int] = {("MedRAG/wikipedia", "train"): 29_913_202}


def model_shapes(spec: StudySpec) -> ModelShapes | None:
    """The shapes of the spec's embedder and generator; None if either is not in the tables."""
    embedder = _EMBEDDERS.get(spec.models.embedder)
    generator = _GENERATORS.get(spec.models.generator)
    if embedder is None or generator is None:
        return None
    return ModelShapes(embedder, generator)


def embedder_shape(spec: StudySpec) -> ModelShape | None:
    """The shape of the spec's embedder; None if it is not in the table."""
    return _EMBEDDERS.get(spec.models.embedder)


def embedding_dimension(spec: StudySpec) -> int | None:
    """The length of the spec's embedder's vectors; None if it is not in the table."""
    return _DIMENSIONS.get(spec.models.embedder)


def unknown_models(spec: StudySpec) -> list[str]:
    """Each of the spec's models the tables lack, with the names they know."""
    unknown = []
    for role, name, table in (
        ("embedder", spec.models.embedder, _EMBEDDERS),
        ("generator", spec.models.generator, _GENERATORS),
    ):
        if name not in table:
            unknown.append(
                f"{role} '{name}' is not in search/sizes.py's table (known: {', '.join(table)})"
            )
    return unknown


def hub_questions(data: DataConfig) -> int | None:
    """Questions in the hub split ``data`` reads (its hub_split, else the source's default);
    None for local data or a split not listed."""
    if data.path is not None or data.hub_name is None:
        return None
    split = data.hub_split or _DEFAULT_HUB_SPLITS.get(data.source, "")
    return _HUB_QUESTIONS.get((data.hub_name, split))


def hub_passages(name: str, split: str) -> int | None:
    """Passages of the hub corpus ``name``'s ``split`` as published; None if not listed."""
    return _HUB_PASSAGES.get((name, split))
