"""Early stopping within a stage: successive halving over the rungs its trials report.

A trial of a launch with ``search.early_stopping`` reports at each rung (:mod:`trainers.rungs`)
through Tune; the launch's Tune scheduler hands the report to the searcher, which stores the value
as the Optuna trial's intermediate value at that rung and asks the stage study's pruner
(:class:`RungPruner`). A trial it prunes is stopped by Tune (the worker's report raises there) and
stored PRUNED with its cost so far.

Why Optuna's pruner and not Tune's ASHA scheduler: Tune's schedulers compare every trial of a run,
and one launch runs every stage in one Tune run; the stage studies hold each stage's values, show
them in optuna-dashboard, and outlive the launch, so a relaunch compares against them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
from ray.tune.schedulers import TrialScheduler

from search.launch._memory_kills import MemoryKillReports
from search.spec import StudySpec

__all__ = ["RUNG_KEY", "RungPruner", "RungStops", "stage_pruner"]

# The result key of a rung report: the TrialOutcome the trial has if it stops there (its cost so
# far and ``pruned_at``, the rung), as JSON.
RUNG_KEY = "ragsweep_rung"


_COMPARED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
)


class RungPruner(optuna.pruners.BasePruner):
    """Asynchronous successive halving at every rung a trial reports: it goes on from a rung only
    if its value there is among the best ``1 / reduction_factor`` of the values its study's trials
    (complete, pruned or running) reported at that rung so far, itself included (while fewer than
    ``reduction_factor`` have, only if it is the best), as Optuna's SuccessiveHalvingPruner
    decides at its rungs.

    Optuna's own pruner places rungs where the step doubles (1, 2, 4, ... with a reduction factor
    of 2); here every reported step is a rung, wherever the spec put it in training."""

    def __init__(self, reduction_factor: int) -> None:
        self.reduction_factor = reduction_factor

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        rung = trial.last_step
        if rung is None:
            return False
        value = trial.intermediate_values[rung]
        if not math.isfinite(value):
            return True
        # A trial that failed after the rung is no standard: beside it every other could stop.
        others = [
            other.intermediate_values[rung]
            for other in study.get_trials(deepcopy=False, states=_COMPARED)
            if other.number != trial.number and rung in other.intermediate_values
        ]
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        competing = sorted([value, *others], reverse=maximize)  # best first
        kept = max(1, len(competing) // self.reduction_factor)
        worst_kept = competing[kept - 1]
        return value < worst_kept if maximize else value > worst_kept


def stage_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner of every stage study of ``spec``'s launch."""
    early_stopping = spec.search.early_stopping
    if early_stopping is None:
        return optuna.pruners.NopPruner()  # a trial reports once, at its end
    return RungPruner(early_stopping.reduction_factor)


class RungStops(MemoryKillReports):
    """The launch's Tune scheduler with early stopping: as :class:`MemoryKillReports`, and each
    rung report goes to ``on_rung(trial_id, payload)``, which says whether the trial stops."""

    def __init__(
        self, on_kill: Callable[[str, str], None], on_rung: Callable[[str, str], bool]
    ) -> None:
        super().__init__(on_kill)
        self._on_rung = on_rung

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if RUNG_KEY in result and self._on_rung(trial.trial_id, result[RUNG_KEY]):
            return str(TrialScheduler.STOP)
        return str(TrialScheduler.CONTINUE)
