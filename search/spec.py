"""The study spec: one YAML file a user copies and edits, validated by pydantic.

Every field has a default that the embedded demo relies on. A spec resolves into one
:class:`trainers.config.TrialConfig` per trial with :func:`trial_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from search.metrics import COST_METRICS, QUALITY_METRICS
from trainers.config import (
    EMBEDDER_ALIASES,
    GENERATOR_ALIASES,
    METHODS,
    DataConfig,
    Method,
    ModelsConfig,
    TrainingConfig,
    TrialConfig,
)
from trainers.errors import ConfigError

__all__ = [
    "PAPER_GRID",
    "EarlyStopping",
    "Objective",
    "ResourcesSpec",
    "SearchSpec",
    "StudySpec",
    "load_spec",
    "trial_config",
]


# The paper's learning-rate grid, used for each model (section 4).
PAPER_GRID: tuple[float, ...] = (1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# Larger values are mistakes (a typo, an exponent too many), not studies anyone runs.
_MAX_GRID = 100


class EarlyStopping(_Strict):
    """Successive halving within each stage: at each rung a trial stops when its signal is not
    among the best ``1 / reduction_factor`` of its stage's signals at that rung so far and trails
    the best by more than the signal's resolution plus ``noise_z`` standard errors of their paired
    per-question difference."""

    # Fractions of each phase a trial trains at which it takes the signal: the gold answer's
    # log-probability on the first ``questions`` validation questions, or for a phase that trains
    # the embedder alone the gold passages' reciprocal rank on every labelled one.
    rungs: list[float] = Field(default_factory=lambda: [0.25, 0.5], min_length=1, max_length=20)
    questions: int = Field(8, gt=0, le=100_000)
    reduction_factor: int = Field(2, ge=2, le=100)
    noise_z: float = Field(2.0, ge=0, le=10)  # 0: plain successive halving

    @field_validator("rungs")
    @classmethod
    def _rungs_inside_training(cls, rungs: list[float]) -> list[float]:
        if any(not 0 < fraction < 1 for fraction in rungs) or rungs != sorted(set(rungs)):
            raise ValueError(
                "give increasing fractions of a phase between 0 and 1, e.g. [0.25, 0.5]"
            )
        return rungs


class SearchSpec(_Strict):
    """How learning rates are searched: a grid (the paper) or a sampler over log ranges."""

    sampler: Literal["grid", "tpe", "random"] = "grid"
    lr_embedder: list[PositiveFloat] = Field(
        default_factory=lambda: list(PAPER_GRID)
    )  # grid values
    lr_generator: list[PositiveFloat] = Field(default_factory=lambda: list(PAPER_GRID))
    lr_embedder_range: tuple[PositiveFloat, PositiveFloat] = (1e-8, 1e-4)  # tpe/random, log-uniform
    lr_generator_range: tuple[PositiveFloat, PositiveFloat] = (1e-8, 1e-4)
    n_trials: int = Field(9, gt=0, le=10_000)  # tpe/random: trials per searched learning rate
    # Joint methods couple the two rates: search the Cartesian grid, or reuse the pair another
    # method found (the paper reuses two_phase's pair for rag_token and rag_sequence).
    joint: Literal["cartesian", "reuse"] = "cartesian"
    joint_reuse_from: Method = "two_phase"
    # Stop trials whose rung signal trails their stage's (`true` for the defaults); None: every
    # trial runs to its end. Left out of dumps when off, so studies stored before it read the same.
    early_stopping: EarlyStopping | None = Field(None, exclude_if=lambda off: off is None)

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _early_stopping_switch(cls, value: object) -> object:
        # `early_stopping: true` (or --set search.early_stopping=true) turns it on as it comes.
        if value is True:
            return {}
        return None if value is False else value

    @field_validator("lr_embedder", "lr_generator")
    @classmethod
    def _grid_not_empty(cls, grid: list[float]) -> list[float]:
        if not grid:
            raise ValueError("list at least one learning rate")
        if len(grid) > _MAX_GRID:
            raise ValueError(f"{len(grid)} learning rates; list at most {_MAX_GRID}")
        if len(set(grid)) != len(grid):
            raise ValueError("remove the repeated learning rates")
        return grid

    @field_validator("lr_embedder_range", "lr_generator_range")
    @classmethod
    def _range_ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if bounds[0] >= bounds[1]:
            raise ValueError("give [low, high] with low < high")
        return bounds


class Objective(_Strict):
    """A metric to optimise: a quality figure (maximised) or a cost figure (minimised)."""

    metric: str = "f1"
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="after")
    def _known_metric(self) -> Objective:
        # A name no trial reports would train every trial fully and then fail each one.
        if self.metric not in (*QUALITY_METRICS, *COST_METRICS):
            raise ValueError(
                f"'{self.metric}' is not a figure trials report; use one of "
                f"{', '.join((*QUALITY_METRICS, *COST_METRICS))}"
            )
        wanted = "maximize" if self.metric in QUALITY_METRICS else "minimize"
        if self.direction != wanted:
            kind = "quality" if wanted == "maximize" else "cost"
            raise ValueError(f"{self.metric} is a {kind} figure; set direction: {wanted} for it")
        return self


class ResourcesSpec(_Strict):
    """What each trial asks Ray for."""

    cpus: PositiveFloat = 1.0
    gpus: float = Field(0.0, ge=0.0)
    # Memory per trial (bytes, or "6GiB", "512MB"): Ray starts a trial only where this much is
    # free. None: each stage's forecast peak (``ragsweep plan`` shows it).
    memory: ByteSize | None = Field(None, gt=0)


class StudySpec(_Strict):
    """A study: which methods to compare on which data and models, trained and searched how."""

    # The study's name: Optuna study names (<name>/<stage>) and folders under the runs dir.
    name: str = Field("demo", pattern=_NAME_PATTERN)
    # An Optuna storage URL; None: a SQLite file beside the spec. Where a study is kept is not part
    # of it: left out of dumps, so that a password in it is neither stored nor sent to trials.
    storage: str | None = Field(None, exclude=True)
    methods: list[Method] = Field(default_factory=lambda: list(METHODS))
    seed: int = 0
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    training: TrainingConfig = TrainingConfig()
    search: SearchSpec = SearchSpec()
    # Several objectives make a multi-objective study; the first picks "best" runs for later stages.
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()])
    resources: ResourcesSpec = ResourcesSpec()
    concurrency: int = Field(1, gt=0, le=10_000)
    # Minutes of training between a trial's resume points (and one at every rung and phase end),
    # from which the trial continues when a relaunch runs it again after its launch or machine
    # died; 0: one after every optimizer step (each writes the trained weights); None: none are
    # saved. Not part of the results (a resumed trial ends as it would have).
    resume_every_minutes: float | None = Field(10.0, ge=0.0)

    @field_validator("objectives")
    @classmethod
    def _objectives_not_empty(cls, objectives: list[Objective]) -> list[Objective]:
        if not objectives:
            raise ValueError("list at least one objective, e.g. {metric: f1, direction: maximize}")
        return objectives

    @model_validator(mode="after")
    def _early_stopping_has_one_quality_objective(self) -> StudySpec:
        # Optuna prunes single-objective studies only, and the rung signal stands for quality.
        if self.search.early_stopping is not None and (
            len(self.objectives) > 1 or self.objectives[0].metric not in QUALITY_METRICS
        ):
            raise ValueError(
                "search.early_stopping needs one objective, a quality figure (em, f1 or "
                "recall_at_k); remove the others or turn early stopping off"
            )
        return self

    @model_validator(mode="after")
    def _retrieval_evaluation_ranks_by_recall(self) -> StudySpec:
        # Nothing is generated: a trial would train fully and then have no EM or F1 to report.
        unscored = [o.metric for o in self.objectives if o.metric in ("em", "f1")]
        if self.training.evaluate == "retrieval" and unscored:
            raise ValueError(
                f"training.evaluate is retrieval, which scores Recall@k only, but the objectives "
                f"ask for {', '.join(unscored)}; use {{metric: recall_at_k, direction: maximize}} "
                "or evaluate answers"
            )
        return self

    @field_validator("methods")
    @classmethod
    def _methods_not_empty(cls, methods: list[str]) -> list[str]:
        if not methods:
            raise ValueError(f"list at least one method of {', '.join(METHODS)}")
        return methods


def load_spec(path: Path, overrides: dict[str, object] | None = None) -> StudySpec:
    """Read and validate a spec; ``overrides`` maps dotted keys (``data.path``) to values."""
    raw = _read_yaml(path)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_first_error(e)}") from e
    return _with_absolute_paths(spec)


# A spec is a few kB of YAML; anything much larger is the wrong file.
_MAX_SPEC_BYTES = 1 << 20


def _read_yaml(path: Path) -> dict[str, object]:
    """The spec file's mapping, or one line saying why it cannot be read as a spec."""
    example = "pass a study YAML such as studies/demo.yaml"
    try:
        if path.is_dir():
            raise ConfigError(f"spec {path} is a folder; {example}")
        if path.stat().st_size > _MAX_SPEC_BYTES:
            raise ConfigError(
                f"spec {path} is {path.stat().st_size / 2**20:.0f} MiB, not a spec (a few kB); {example}"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"spec file {path} does not exist; {example}") from e
    except PermissionError as e:
        raise ConfigError(f"cannot read spec {path}: permission denied; make it readable") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"spec {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML"
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot read spec {path}: {e.strerror}; {example}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the syntax there") from e
    if raw is None:
        raise ConfigError(f"spec {path} is empty; copy studies/demo.yaml and edit it")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must hold a mapping of spec fields (name, methods, data, ...), not {type(raw).__name__}"
        )
    return raw


def _with_absolute_paths(spec: StudySpec) -> StudySpec:
    """Local files named relative to where ragsweep runs, made absolute: trial workers run
    elsewhere (Ray Tune's trial folders, other machines), and the stored spec must still work."""
    data_paths = {
        field: str(Path(value).resolve())
        for field in ("path", "corpus_path")
        if (value := getattr(spec.data, field))
    }
    # The loaders take an alias first, then a local folder, then a hub id.
    model_paths = {
        field: str(Path(value).resolve())
        for field, aliases in (("embedder", EMBEDDER_ALIASES), ("generator", GENERATOR_ALIASES))
        if (value := getattr(spec.models, field)) not in aliases and Path(value).exists()
    }
    return spec.model_copy(
        update={
            "data": spec.data.model_copy(update=data_paths),
            "models": spec.models.model_copy(update=model_paths),
        }
    )


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
            method=method,
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
    """The first problem pydantic found, as "<field>: <what is wrong>; <fix>"."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "spec"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown field '{where}'{more}; remove it or check its spelling"
    if ";" in message:  # our own validators say what to do
        return f"{where}: {message}{more}"
    given = first.get("input")
    shown = "" if isinstance(given, dict | list) or given is None else f", not {given!r}"
    return f"{where}: {message[:1].lower()}{message[1:]}{shown}{more}; change {where} in the spec"
