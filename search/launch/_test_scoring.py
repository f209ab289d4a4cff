"""Which trials score the held-out test split (``data.n_test``): a trial does when its validation
score is at least its stage's best so far. The stage's best, the run a study chooses, is then
always scored, and a trial that trails skips an evaluation as long as validation's (on PopQA at
300 questions, a third of a generator trial on CPU).

The launch keeps each stage's lead in one small Ray actor, which trial workers on any node ask
once, after validation; it starts from what the stages' completed trials scored before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
import ray

from search.launch._stage_results import stage_best
from search.spec import StudySpec

__all__ = ["TestClaim", "start_stage_leads"]


class _StageLeads:
    """Per stage, the validation scores of the trials that led it when they finished (a Ray
    actor in a launch)."""

    def __init__(self, leads: dict[str, float], metric: str, maximize: bool) -> None:
        self._claims = {stage: {"earlier launches": value} for stage, value in leads.items()}
        self._metric, self._sign = metric, 1.0 if maximize else -1.0

    def claim(self, stage: str, trial: str, quality: dict[str, float]) -> bool:
        """Whether ``trial`` scores the test split: it leads (or ties) its stage's finished trials."""
        if self._metric not in quality:
            return True  # a cost objective: no quality lead to keep, so every trial is scored
        value = self._sign * quality[self._metric]
        claims = self._claims.setdefault(stage, {})
        if claims and value < max(self._sign * lead for lead in claims.values()):
            return False
        claims[trial] = quality[self._metric]
        return True

    def release(self, stage: str, trial: str) -> None:
        """Forget ``trial``'s lead: it failed after claiming, so it will not be the stage's best."""
        self._claims.get(stage, {}).pop(trial, None)


def start_stage_leads(spec: StudySpec, studies: dict[str, optuna.Study]) -> Any:
    """The launch's stage leads (an actor handle for the trainable), or None without a test split."""
    if not spec.data.n_test:
        return None
    first = spec.objectives[0]
    bests = {stage: stage_best(study, spec) for stage, study in studies.items()}
    leads = {stage: best.metrics[first.metric] for stage, best in bests.items() if best}
    # No CPU: it answers a question per trial, and must not take a trial's slot.
    maximize = first.direction == "maximize"
    return ray.remote(num_cpus=0)(_StageLeads).remote(leads, first.metric, maximize)


@dataclass
class TestClaim:
    """One trial's question to the stage leads, as :func:`trainers.run_trial`'s ``score_test``."""

    leads: Any  # the handle start_stage_leads returned
    stage: str
    trial: str
    claimed: bool = False

    __test__ = False  # not a pytest class, whatever its name says

    def __call__(self, quality: dict[str, float]) -> bool:
        self.claimed = ray.get(self.leads.claim.remote(self.stage, self.trial, quality))
        return self.claimed

    def release(self) -> None:
        """After a failure: a trial that claimed the lead gives it back."""
        if self.claimed:
            self.leads.release.remote(self.stage, self.trial)
