"""The study spec: one YAML file a user copies and edits, validated by pydantic.

Every field has a default that the embedded demo relies on. A spec resolves into one
:class:`trainers.config.TrialConfig` per trial with :func:`trial_config`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainers.config import METHODS, DataConfig, Method, ModelsConfig, TrainingConfig, TrialConfig
from trainers.errors import ConfigError

__all__ = ["StudySpec", "load_spec", "trial_config"]


class StudySpec(BaseModel):
    """A study: which methods to compare on which data and models, trained how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "demo"
    methods: list[Method] = Field(default_factory=lambda: list(METHODS))
    seed: int = 0
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    training: TrainingConfig = TrainingConfig()

    @field_validator("methods")
    @classmethod
    def _methods_not_empty(cls, methods: list[str]) -> list[str]:
        if not methods:
            raise ValueError(f"list at least one method of {', '.join(METHODS)}")
        return methods


def load_spec(path: Path, overrides: dict[str, object] | None = None) -> StudySpec:
    """Read and validate a spec; ``overrides`` maps dotted keys (``data.path``) to values."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(
            f"spec file {path} does not exist; pass the path of a study YAML such as studies/demo.yaml"
        ) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the syntax there") from e
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must hold a mapping of spec fields (name, methods, data, ...), not {type(raw).__name__}"
        )
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_first_error(e)}") from e


def trial_config(
    spec: StudySpec,
    method: str,
    *,
    lr_embedder: float | None,
    lr_generator: float | None,
    seed: int | None = None,
    reuse: dict[str, str] | None = None,
) -> TrialConfig:
    """The resolved configuration of one trial of ``spec``."""
    try:
        return TrialConfig(
            method=method,  # type: ignore[arg-type]
            lr_embedder=lr_embedder,
            lr_generator=lr_generator,
            seed=spec.seed if seed is None else seed,
            data=spec.data,
            models=spec.models,
            training=spec.training,
            reuse=reuse or {},
        )
    except ValidationError as e:
        raise ConfigError(_first_error(e)) from e


def _set_dotted(raw: dict[str, object], dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a mapping in the spec")
        node = child
    node[leaf] = value


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "spec"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown field '{where}'{more}; remove it or check its spelling"
    return f"{where}: {message}{more}"
