"""Checks of a study's devices and data that need no model: a preflight runs them before it loads
any model library, so that such a mistake is reported in seconds."""

from __future__ import annotations

import torch

from trainers.data import MIN_LABELLED_TRAIN, RagData
from trainers.errors import ConfigError, or_list
from trainers.methods import label_free_embedder_methods

__all__ = ["require_context_labels", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"training.device is '{name}' but no CUDA device is visible; use 'auto' or 'cpu'"
        )
    return torch.device(name)


def require_context_labels(method: str, data: RagData) -> None:
    """Refuse ``method``, which trains the embedder on context labels (MNRL), when fewer than
    ``MIN_LABELLED_TRAIN`` training questions have a gold document; partly labelled data is fine."""
    if data.has_context_labels:
        return
    labelled, total = len(data.labelled_train), len(data.train)
    share = f"only {labelled} of {total}" if labelled else f"none of the {total}"
    raise ConfigError(
        f"method '{method}' trains the embedder on context labels, but {share} training "
        f"questions {'has' if labelled <= 1 else 'have'} a gold document (at least "
        f"{MIN_LABELLED_TRAIN} are needed); label more questions (gold_doc_ids) or use "
        f"{or_list(label_free_embedder_methods())} instead"
    )
