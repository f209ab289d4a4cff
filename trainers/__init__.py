"""ragsweep's science: RAG fine-tuning methods on real models with frozen FAISS retrieval.

Plain PyTorch, transformers and FAISS; importable without Ray, Optuna or ``search``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainers.config import METHODS, DataConfig, ModelsConfig, TrainingConfig, TrialConfig
from trainers.errors import ConfigError, DataError, ModelError, RagsweepError, TrainingError

if TYPE_CHECKING:
    from trainers.trial import TrialResult, run_trial

__all__ = [
    "METHODS",
    "ConfigError",
    "DataConfig",
    "DataError",
    "ModelError",
    "ModelsConfig",
    "RagsweepError",
    "TrainingConfig",
    "TrainingError",
    "TrialConfig",
    "TrialResult",
    "run_trial",
]


def __getattr__(name: str) -> Any:
    # torch and transformers load on first use, so `ragsweep trials` and other queries start in
    # well under a second instead of importing the whole training stack.
    if name in ("TrialResult", "run_trial"):
        from trainers import trial

        return getattr(trial, name)
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")
