"""Tiny trial configurations: random few-layer models and a small generated dataset, for fast tests."""

from __future__ import annotations

from trainers.config import (
    DataConfig,
    GeneratedDataConfig,
    ModelsConfig,
    TrainingConfig,
    TrialConfig,
)

TINY_DATA = DataConfig(n_train=16, n_validation=8, generated=GeneratedDataConfig(n_entities=12))
TINY_MODELS = ModelsConfig(embedder="tiny", generator="tiny")
TINY_TRAINING = TrainingConfig(
    batch_size_embedder=4,
    batch_size_generator=4,
    k=3,
    max_doc_tokens=32,
    max_new_tokens=4,
    precision="fp32",  # exact comparisons; the real-model tests run with "auto"
    eval_batch_size=8,
)


def tiny_config(method: str, **overrides) -> TrialConfig:
    fields = dict(
        method=method,
        lr_embedder=1e-3,
        lr_generator=1e-3,
        data=TINY_DATA,
        models=TINY_MODELS,
        training=TINY_TRAINING,
    )
    return TrialConfig(**(fields | overrides))


# The same settings as a study spec (YAML-shaped), for tests of the CLI and of launches.
TINY_SPEC: dict[str, object] = {
    "name": "tiny",
    "data": TINY_DATA.model_dump(mode="json", exclude_unset=True),
    "models": TINY_MODELS.model_dump(mode="json", exclude_unset=True),
    "training": TINY_TRAINING.model_dump(mode="json", exclude_unset=True),
}


def tiny_rows() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """The whole tiny data set (every question, train and validation) as canonical rows:
    (passages, questions), for tests that give it to a study as files."""
    from trainers.data import load_data

    whole = load_data(TINY_DATA.model_copy(update={"n_train": None}))
    passages: list[dict[str, object]] = [
        vars(d) for d in whole.corpus.documents(range(len(whole.corpus)))
    ]
    questions: list[dict[str, object]] = [
        {
            "id": q.id,
            "question": q.question,
            "answers": list(q.answers),
            "gold_doc_ids": list(q.gold_doc_ids),
        }
        for q in [*whole.train, *whole.validation]
    ]
    return passages, questions
