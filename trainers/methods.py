"""The fine-tuning methods of the paper, each a sequence of phases.

A phase trains the embedder E, the generator G or both through one objective (DESIGN.md, sub-
processes a-d). Methods are data, so the plan in ``search`` can read what a method trains and which
phases two methods share without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainers.config import TrainingConfig

__all__ = ["Phase", "method_phases", "needs_context_labels", "trains"]

Objective = Literal["mnrl", "nll_concat", "rag_token", "rag_sequence"]


@dataclass(frozen=True)
class Phase:
    """One training phase: its name (also its checkpoint folder), what it trains and its loss."""

    name: str
    trains_embedder: bool
    trains_generator: bool
    objective: Objective


def method_phases(method: str, training: TrainingConfig) -> tuple[Phase, ...]:
    """The phases ``method`` runs, in order."""
    ft_gen = Phase("generator", False, True, training.ft_gen_objective)  # (c), or answer NLL
    ft_embed = Phase("embedder", True, False, "mnrl")  # (a)
    phases: dict[str, tuple[Phase, ...]] = {
        "none": (),
        "ft_embed": (ft_embed,),
        "ft_gen": (ft_gen,),
        # G first, so it learns from the baseline E's context exactly as ft_gen does; MNRL never
        # reads G, so E's phase is the same as ft_embed's.
        "independent": (ft_gen, ft_embed),
        # Phase 1 is (c) with RAG-Token (ft_gen with objective rag_token); phase 2 is (b) from it.
        "two_phase": (
            Phase("generator", False, True, "rag_token"),
            Phase("embedder_rag", True, False, "rag_token"),
        ),
        "rag_token": (Phase("joint", True, True, "rag_token"),),  # (d)
        "rag_sequence": (Phase("joint", True, True, "rag_sequence"),),  # (d)
    }
    return phases[method]


def trains(method: str, training: TrainingConfig) -> tuple[bool, bool]:
    """(trains the embedder, trains the generator) for ``method``."""
    phases = method_phases(method, training)
    return any(p.trains_embedder for p in phases), any(p.trains_generator for p in phases)


def needs_context_labels(method: str, training: TrainingConfig) -> bool:
    """Whether ``method`` needs gold documents for its training questions (MNRL does)."""
    return any(phase.objective == "mnrl" for phase in method_phases(method, training))
