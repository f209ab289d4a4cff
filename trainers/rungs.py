"""Rungs: a validation signal taken part-way through training, for early stopping.

A trial run with :class:`Rungs` takes, at given fractions of each phase it trains, a
:class:`Signal` per validation question and hands it to ``Rungs.report``, which may stop the trial
by raising. Per question, so that whoever decides can pair two trials' values over the same
questions and tell a real gap from noise. The signal changes nothing in training: the same trial
with and without rungs reports the same quality.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Rung", "Rungs", "Signal", "rung_steps", "rung_taker"]


@dataclass(frozen=True)
class Signal:
    """A phase's rung signal: its name, the validation questions it reads, how to take it (one
    value per question, in that order, higher is better), and the smallest gap between two
    trials' means that matters (a trial trailing by less is as good as level)."""

    name: str  # "answer_logprob" or "gold_doc_rr"
    question_ids: tuple[str, ...]
    take: Callable[[], list[float]]
    resolution: float


@dataclass(frozen=True)
class Rung:
    """One signal: where in training it was taken, its value, and the trial's cost so far."""

    number: int  # 1, 2, ... over the phases the trial trains, in order
    phase: str
    step: int  # optimizer steps the phase had done
    steps: int  # the phase's steps in all
    signal: str  # Signal.name
    value: float  # the mean over the questions; higher is better
    resolution: float  # Signal.resolution
    per_question: dict[str, float] = field(repr=False)  # question id -> value
    wall_s: float = 0.0  # what taking it cost
    metrics: dict[str, float] = field(default_factory=dict, repr=False)  # cost so far

    def summary(self) -> dict[str, object]:
        """The rung as the trial's record keeps it (per-question values and cost left out)."""
        return {
            "rung": self.number,
            "phase": self.phase,
            "step": self.step,
            "steps": self.steps,
            "signal": self.signal,
            "value": self.value,
            "resolution": self.resolution,
            "questions": len(self.per_question),
            "wall_s": self.wall_s,
        }


@dataclass(frozen=True)
class Rungs:
    """Where a trial takes its signal, on how many validation questions, and who hears it."""

    fractions: tuple[float, ...]  # of each trained phase's steps, each in (0, 1)
    questions: int  # the answer signal reads the first ``questions`` validation questions
    report: Callable[[Rung], None]  # raises to stop the trial


def rung_steps(fractions: Sequence[float], steps: int) -> set[int]:
    """The steps of a ``steps``-step phase after which a signal is taken: each fraction of it,
    at least one step in, and before the last (the evaluation follows the last step)."""
    return {max(1, round(fraction * steps)) for fraction in fractions} - {steps}


def rung_taker(
    rungs: Rungs | None,
    phase: str,
    signal: Signal | None,
    cost_so_far: Callable[[], dict[str, float]],
    taken: list[Rung],
) -> Callable[[int, int], None] | None:
    """The ``after_step`` hook of :func:`trainers.train.train_phase` that takes ``phase``'s rungs
    (appending each to ``taken``), or None without rungs."""
    if rungs is None or signal is None:
        return None

    def after_step(step: int, steps: int) -> None:
        if step not in rung_steps(rungs.fractions, steps):
            return
        start = time.perf_counter()
        values = signal.take()
        rung = Rung(
            number=len(taken) + 1,
            phase=phase,
            step=step,
            steps=steps,
            signal=signal.name,
            value=sum(values) / len(values),
            resolution=signal.resolution,
            per_question=dict(zip(signal.question_ids, values, strict=True)),
            wall_s=time.perf_counter() - start,
            metrics=cost_so_far(),
        )
        taken.append(rung)
        rungs.report(rung)

    return after_step
