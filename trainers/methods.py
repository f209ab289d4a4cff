"""The fine-tuning methods of the paper, each declared once as a sequence of phases.

A phase trains the embedder E, the generator G or both through one objective (the paper's sub-
processes: (a) E on context labels with MNRL, (b) E through a RAG loss with G frozen, (c) G on
retrieved context, (d) both through a RAG loss), or it is another method's phase, which a study
loads from that method's best trial instead of training it again. Methods are data: the trainer
runs the phases' objectives, and the plan in ``search`` reads what a method searches, what it
takes from other methods and where it runs in a study, without running anything. Adding a method
is one :class:`MethodDeclaration` passed to :func:`register_method` (and its loss, for a new
objective).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from trainers.errors import ConfigError

if TYPE_CHECKING:
    from trainers.config import TrainingConfig

__all__ = [
    "FT_GEN_OBJECTIVE",
    "METHODS",
    "RATES",
    "LearningRate",
    "LoadedPhase",
    "MethodDeclaration",
    "Objective",
    "Phase",
    "TrainedPhase",
    "label_free_embedder_methods",
    "method_declaration",
    "method_declarations",
    "method_names",
    "method_phases",
    "needs_context_labels",
    "phase_rates",
    "register_method",
    "trains",
]

Objective = Literal["mnrl", "nll_concat", "rag_token", "rag_sequence"]
LearningRate = Literal["lr_embedder", "lr_generator"]
RATES: tuple[LearningRate, ...] = ("lr_embedder", "lr_generator")
# A trained phase may declare this as its objective: the one training.ft_gen_objective names.
FT_GEN_OBJECTIVE: Literal["training.ft_gen_objective"] = "training.ft_gen_objective"
# Method and phase names become stage names ("<method>.<phase>"), study names ("<study>/<stage>")
# and checkpoint folders.
_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Phase:
    """One training phase: its name (also its checkpoint folder), what it trains and its loss."""

    name: str
    trains_embedder: bool
    trains_generator: bool
    objective: Objective


@dataclass(frozen=True)
class TrainedPhase:
    """A phase a method trains itself; ``objective`` may be :data:`FT_GEN_OBJECTIVE`."""

    name: str
    trains_embedder: bool
    trains_generator: bool
    objective: Objective | Literal["training.ft_gen_objective"]

    def resolve(self, training: TrainingConfig) -> Phase:
        """The phase as a trial with ``training`` runs it."""
        objective = (
            training.ft_gen_objective if self.objective == FT_GEN_OBJECTIVE else self.objective
        )
        return Phase(self.name, self.trains_embedder, self.trains_generator, objective)


@dataclass(frozen=True)
class LoadedPhase:
    """Another method's phase of the same name, as that method trains it with the TrainingConfig
    fields in ``training`` set. A study loads it from the best trial of that method's stage,
    learning rates included, instead of training it; a trial given no checkpoint trains it."""

    name: str
    method: str
    training: tuple[tuple[str, object], ...] = ()  # (field, value) pairs: frozen and picklable

    @property
    def overrides(self) -> dict[str, object]:
        """``training`` as a dict for ``TrainingConfig.model_copy(update=...)``."""
        return dict(self.training)


@dataclass(frozen=True)
class MethodDeclaration:
    """A fine-tuning method: its phases in the order a trial runs them, and its rank in a study's
    run order among stages that do not depend on each other (lower first: cheap and widely shared
    methods first, so the stages waiting on them can start)."""

    name: str
    phases: tuple[TrainedPhase | LoadedPhase, ...]
    rank: int = 100  # after the paper's methods

    @property
    def trained(self) -> tuple[TrainedPhase, ...]:
        """The phases the method trains itself."""
        return tuple(phase for phase in self.phases if isinstance(phase, TrainedPhase))

    @property
    def loaded(self) -> tuple[LoadedPhase, ...]:
        """The phases it takes from other methods."""
        return tuple(phase for phase in self.phases if isinstance(phase, LoadedPhase))

    @property
    def rates(self) -> tuple[LearningRate, ...]:
        """The learning rates its own phases train: what a study searches for it."""
        return tuple(
            rate for rate in RATES if any(rate in phase_rates(phase) for phase in self.trained)
        )

    @property
    def joint(self) -> bool:
        """Whether its own phases train both models, so a search couples the two rates."""
        return self.rates == RATES


_EMBEDDER = TrainedPhase("embedder", True, False, "mnrl")  # (a)
_GENERATOR = TrainedPhase("generator", False, True, FT_GEN_OBJECTIVE)  # (c), or answer NLL
_PAPER_METHODS = (
    MethodDeclaration("none", (), rank=0),
    MethodDeclaration("ft_embed", (_EMBEDDER,), rank=10),
    MethodDeclaration("ft_gen", (_GENERATOR,), rank=20),
    # G first, so it learns from the baseline E's context exactly as ft_gen does; MNRL never
    # reads G, so E's phase is the same as ft_embed's.
    MethodDeclaration(
        "independent",
        (LoadedPhase("generator", "ft_gen"), LoadedPhase("embedder", "ft_embed")),
        rank=30,
    ),
    # Phase 1 is (c) with RAG-Token (ft_gen with objective rag_token); phase 2 is (b) from it.
    MethodDeclaration(
        "two_phase",
        (
            LoadedPhase("generator", "ft_gen", (("ft_gen_objective", "rag_token"),)),
            TrainedPhase("embedder_rag", True, False, "rag_token"),
        ),
        rank=40,
    ),
    # (d): both models through the RAG loss, their rates coupled.
    MethodDeclaration("rag_token", (TrainedPhase("joint", True, True, "rag_token"),), rank=50),
    MethodDeclaration(
        "rag_sequence", (TrainedPhase("joint", True, True, "rag_sequence"),), rank=60
    ),
)
_REGISTRY: dict[str, MethodDeclaration] = {}


def register_method(method: MethodDeclaration) -> MethodDeclaration:
    """Make ``method`` a valid ``TrialConfig.method`` and study method in this process.

    Registering an equal declaration again does nothing (each process that builds trial configs
    registers what the study declared); a different one under a taken name is a ConfigError.
    Overridden ``training`` fields of loaded phases must be TrainingConfig fields.
    """
    from trainers.config import TrainingConfig

    for phase in method.loaded:
        unknown = sorted(set(phase.overrides) - set(TrainingConfig.model_fields))
        if unknown:
            raise ConfigError(
                f"method '{method.name}': phase '{phase.name}' sets {unknown}, which are not "
                "training fields; use fields of TrainingConfig"
            )
    return _register(method)


def _register(method: MethodDeclaration) -> MethodDeclaration:
    known = _REGISTRY.get(method.name)
    if known == method:
        return method
    if known is not None:
        raise ConfigError(
            f"method '{method.name}' is already registered with other phases; choose another name"
        )
    _check_declaration(method)
    _REGISTRY[method.name] = method
    return method


def _check_declaration(method: MethodDeclaration) -> None:
    where = f"method '{method.name}'"
    names = [method.name, *(phase.name for phase in method.phases)]
    if any(not _NAME.fullmatch(name) for name in names):
        raise ConfigError(
            f"{where}: method and phase names may hold only letters, digits and '_'; got {names}"
        )
    if len(set(names[1:])) != len(names) - 1:
        raise ConfigError(f"{where}: phase names repeat ({names[1:]}); name each phase once")
    for phase in method.trained:
        if not (phase.trains_embedder or phase.trains_generator):
            raise ConfigError(f"{where}: phase '{phase.name}' trains neither model")
        if phase.objective not in (*get_args(Objective), FT_GEN_OBJECTIVE):
            raise ConfigError(
                f"{where}: phase '{phase.name}' has objective '{phase.objective}'; use one of "
                f"{', '.join((*get_args(Objective), FT_GEN_OBJECTIVE))}"
            )
    for loaded in method.loaded:
        source = method_declaration(loaded.method)
        if loaded.name not in {phase.name for phase in source.phases}:
            raise ConfigError(
                f"{where}: phase '{loaded.name}' loads method '{loaded.method}''s phase of that "
                f"name, which it does not have; its phases: "
                f"{', '.join(phase.name for phase in source.phases) or 'none'}"
            )


def method_names() -> tuple[str, ...]:
    """Every registered method, the paper's first."""
    return tuple(_REGISTRY)


def method_declarations() -> tuple[MethodDeclaration, ...]:
    """Every registered declaration, in registration order: what another process (a trial
    worker) registers, in this order, to accept the same methods."""
    return tuple(_REGISTRY.values())


def method_declaration(name: str) -> MethodDeclaration:
    """The declaration registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; use one of {', '.join(_REGISTRY)}") from None


def method_phases(method: str, training: TrainingConfig) -> tuple[Phase, ...]:
    """The phases ``method`` runs, in order."""
    return tuple(_resolve(phase, training) for phase in method_declaration(method).phases)


def phase_rates(phase: TrainedPhase | LoadedPhase) -> tuple[LearningRate, ...]:
    """The learning rates ``phase`` trains with (a loaded phase: those its source trained with)."""
    trained = _trained_as(phase)
    return tuple(
        rate
        for rate, trains in zip(
            RATES, (trained.trains_embedder, trained.trains_generator), strict=True
        )
        if trains
    )


def trains(method: str, training: TrainingConfig) -> tuple[bool, bool]:
    """(trains the embedder, trains the generator) for ``method``."""
    phases = method_phases(method, training)
    return any(p.trains_embedder for p in phases), any(p.trains_generator for p in phases)


def needs_context_labels(method: str, training: TrainingConfig) -> bool:
    """Whether ``method`` needs gold documents for its training questions (MNRL does)."""
    return any(phase.objective == "mnrl" for phase in method_phases(method, training))


def label_free_embedder_methods() -> tuple[str, ...]:
    """The registered methods that train the embedder without context labels."""
    return tuple(
        method.name
        for method in _REGISTRY.values()
        if any(_trained_as(phase).trains_embedder for phase in method.phases)
        and all(_trained_as(phase).objective != "mnrl" for phase in method.phases)
    )


def _trained_as(phase: TrainedPhase | LoadedPhase) -> TrainedPhase:
    """The declaration that trains ``phase``: itself, or its source's (followed to the end)."""
    while isinstance(phase, LoadedPhase):
        source = method_declaration(phase.method)
        phase = next(p for p in source.phases if p.name == phase.name)
    return phase


def _resolve(phase: TrainedPhase | LoadedPhase, training: TrainingConfig) -> Phase:
    while isinstance(phase, LoadedPhase):
        if phase.training:
            training = training.model_copy(update=phase.overrides)
        source = method_declaration(phase.method)
        phase = next(p for p in source.phases if p.name == phase.name)
    return phase.resolve(training)


for _method in _PAPER_METHODS:
    _register(_method)
# The paper's methods: what a study runs unless its spec lists others.
METHODS: tuple[str, ...] = method_names()
