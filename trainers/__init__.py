"""ragsweep's science: RAG fine-tuning methods on real models with frozen FAISS retrieval.

Plain PyTorch, transformers and FAISS; importable without Ray, Optuna or ``search``.
"""

from trainers.config import METHODS, DataConfig, ModelsConfig, TrainingConfig, TrialConfig
from trainers.errors import ConfigError, DataError, ModelError, RagsweepError, TrainingError
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
