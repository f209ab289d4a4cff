"""Rungs: a validation signal taken part-way through training, for early stopping.

A trial run with :class:`Rungs` takes, at given fractions of each phase it trains, the gold
answer's log-probability on its first validation questions (:func:`trainers.evaluate.answer_logprob`)
and hands it to ``Rungs.report``, which may stop the trial by raising. The signal changes nothing
in training: the same trial with and without rungs reports the same quality.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Rung", "Rungs", "rung_steps", "rung_taker"]


@dataclass(frozen=True)
class Rung:
    """One signal: where in training it was taken, its value, and the trial's cost so far."""

    number: int  # 1, 2, ... over the phases the trial trains, in order
    phase: str
    step: int  # optimizer steps the phase had done
    steps: int  # the phase's steps in all
    answer_logprob: float  # higher is better
    wall_s: float  # what taking it cost
    metrics: dict[str, float] = field(repr=False)  # the trial's cost so far (CostMeter.metrics)

    def summary(self) -> dict[str, object]:
        """The rung as the trial's record keeps it (its cost so far left out)."""
        return {
            "rung": self.number,
            "phase": self.phase,
            "step": self.step,
            "steps": self.steps,
            "answer_logprob": self.answer_logprob,
            "wall_s": self.wall_s,
        }


@dataclass(frozen=True)
class Rungs:
    """Where a trial takes its signal, on how many validation questions, and who hears it."""

    fractions: tuple[float, ...]  # of each trained phase's steps, each in (0, 1)
    questions: int  # the first ``questions`` validation questions (a fixed subset)
    report: Callable[[Rung], None]  # raises to stop the trial


def rung_steps(fractions: Sequence[float], steps: int) -> set[int]:
    """The steps of a ``steps``-step phase after which a signal is taken: each fraction of it,
    at least one step in, and before the last (the evaluation follows the last step)."""
    return {max(1, round(fraction * steps)) for fraction in fractions} - {steps}


def rung_taker(
    rungs: Rungs | None,
    phase: str,
    signal: Callable[[], float],
    cost_so_far: Callable[[], dict[str, float]],
    taken: list[Rung],
) -> Callable[[int, int], None] | None:
    """The ``after_step`` hook of :func:`trainers.train.train_phase` that takes ``phase``'s rungs
    (appending each to ``taken``), or None without rungs."""
    if rungs is None:
        return None

    def after_step(step: int, steps: int) -> None:
        if step not in rung_steps(rungs.fractions, steps):
            return
        start = time.perf_counter()
        value = signal()
        rung = Rung(
            number=len(taken) + 1,
            phase=phase,
            step=step,
            steps=steps,
            answer_logprob=value,
            wall_s=time.perf_counter() - start,
            metrics=cost_so_far(),
        )
        taken.append(rung)
        rungs.report(rung)

    return after_step
