"""ragsweep's science: RAG fine-tuning methods on real models with frozen FAISS retrieval.

Plain PyTorch, transformers and FAISS; importable without Ray, Optuna or ``search``. Importing
this package, its configuration, its method declarations, the FLOP formulas and the memory model
loads no torch either: torch and transformers load when a name that needs them is first used, so
``ragsweep plan`` and the query commands start in well under a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainers._generated import generate_encyclopedia
from trainers.config import (
    EMBEDDER_ALIASES,
    EXACT_SEARCH_MAX_PASSAGES,
    GENERATOR_ALIASES,
    METHODS,
    DataConfig,
    IndexConfig,
    Method,
    ModelsConfig,
    TrainingConfig,
    TrialConfig,
    VectorDtype,
)
from trainers.errors import (
    ConfigError,
    DataError,
    ModelError,
    RagsweepError,
    TrainingError,
    causes,
    mask_secrets,
    one_line,
    or_list,
)
from trainers.methods import (
    FT_GEN_OBJECTIVE,
    RATES,
    LearningRate,
    LoadedPhase,
    MethodDeclaration,
    Objective,
    Phase,
    TrainedPhase,
    method_declaration,
    method_declarations,
    method_names,
    method_phases,
    needs_context_labels,
    phase_rates,
    register_method,
    trains,
)
from trainers.results import QuestionResult, questions_json
from trainers.rungs import Rung, Rungs

if TYPE_CHECKING:
    from trainers.corpus import Corpus
    from trainers.cost import forward_flops, training_flops
    from trainers.data import load_data
    from trainers.encode import SHARD_PASSAGES, ShardEncoder, assemble_shards, shard_job
    from trainers.environment import environment_record, native_bf16
    from trainers.memory import (
        CAP_FILL,
        MiB,
        ModelShape,
        TrialMemory,
        resume_point_bytes,
        token_caps,
        trial_memory,
    )
    from trainers.preflight import prepare
    from trainers.resume import Resume, discard_point
    from trainers.trial import TrialResult, run_trial

__all__ = [
    "CAP_FILL",
    "EMBEDDER_ALIASES",
    "SHARD_PASSAGES",
    "Corpus",
    "ShardEncoder",
    "VectorDtype",
    "assemble_shards",
    "shard_job",
    "EXACT_SEARCH_MAX_PASSAGES",
    "FT_GEN_OBJECTIVE",
    "GENERATOR_ALIASES",
    "METHODS",
    "RATES",
    "ConfigError",
    "DataConfig",
    "DataError",
    "IndexConfig",
    "LearningRate",
    "LoadedPhase",
    "Method",
    "MethodDeclaration",
    "MiB",
    "ModelError",
    "ModelShape",
    "ModelsConfig",
    "Objective",
    "Phase",
    "QuestionResult",
    "RagsweepError",
    "Resume",
    "Rung",
    "Rungs",
    "TrainedPhase",
    "TrainingConfig",
    "TrainingError",
    "TrialConfig",
    "TrialMemory",
    "TrialResult",
    "environment_record",
    "forward_flops",
    "load_data",
    "method_declaration",
    "method_declarations",
    "method_names",
    "method_phases",
    "native_bf16",
    "needs_context_labels",
    "causes",
    "discard_point",
    "mask_secrets",
    "one_line",
    "or_list",
    "phase_rates",
    "prepare",
    "questions_json",
    "register_method",
    "resume_point_bytes",
    "run_trial",
    "token_caps",
    "training_flops",
    "trains",
    "trial_memory",
    "generate_encyclopedia",
]

# Public names whose modules load on first use (torch, transformers, FAISS or datasets behind them,
# or simply not needed to import the package).
_LAZY = {
    "Corpus": "trainers.corpus",
    "SHARD_PASSAGES": "trainers.encode",
    "ShardEncoder": "trainers.encode",
    "assemble_shards": "trainers.encode",
    "shard_job": "trainers.encode",
    "forward_flops": "trainers.cost",
    "training_flops": "trainers.cost",
    "load_data": "trainers.data",
    "environment_record": "trainers.environment",
    "native_bf16": "trainers.environment",
    "CAP_FILL": "trainers.memory",
    "MiB": "trainers.memory",
    "ModelShape": "trainers.memory",
    "TrialMemory": "trainers.memory",
    "resume_point_bytes": "trainers.memory",
    "token_caps": "trainers.memory",
    "trial_memory": "trainers.memory",
    "prepare": "trainers.preflight",
    "Resume": "trainers.resume",
    "discard_point": "trainers.resume",
    "TrialResult": "trainers.trial",
    "run_trial": "trainers.trial",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
