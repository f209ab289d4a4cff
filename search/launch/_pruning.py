"""Early stopping within a stage: successive halving over the rungs its trials report.

A trial of a launch with ``search.early_stopping`` reports at each rung (:mod:`trainers.rungs`)
through Tune; the launch's Tune scheduler hands the report to the searcher, which stores the value
as the Optuna trial's intermediate value at that rung and asks the stage study's pruner
(:class:`RungPruner`). A trial it prunes is stopped by Tune (the worker's report raises there) and
stored PRUNED with its cost so far.

Why Optuna's pruner and not Tune's ASHA scheduler: Tune's schedulers compare every trial of a run,
and one launch runs every stage in one Tune run; the stage studies hold each stage's values, show
them in optuna-dashboard, and outlive the launch, so a relaunch compares against them too.

Why a noise test on top of the halving: at a rung, rates that train alike differ by noise (on
PopQA two embedder rates 0.002 nats apart at the first rung ended 2.7 F1 points apart, the other
way round), and plain halving stops any trial that trails, however little, so among tied rates it
picks by chance. Each rung's values are kept per validation question, so a trial is compared with
the rung's best over the same questions (a paired difference) and stops only when it trails by
more than ``noise_z`` standard errors and by more than the signal's resolution (the smallest gap
that matters; :class:`trainers.rungs.Signal`): a precise signal tells apart rates that will
score alike.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from ray.tune.schedulers import TrialScheduler

from search.launch._memory_kills import MemoryKillReports
from search.spec import StudySpec
from search.store import TrialOutcome

__all__ = [
    "RUNG_KEY",
    "RungPruner",
    "RungStops",
    "read_rung_report",
    "rung_report",
    "signal_attr",
    "stage_pruner",
]

# The result key of a rung report (:func:`rung_report`).
RUNG_KEY = "ragsweep_rung"


def rung_report(stopped_here: TrialOutcome, per_question: Mapping[str, float]) -> str:
    """A rung report as JSON: the outcome the trial has if it stops there (its cost so far and
    ``pruned_at``, the rung) and the signal per validation question id."""
    return json.dumps({"outcome": stopped_here.to_json(), "per_question": dict(per_question)})


def read_rung_report(report: str) -> tuple[TrialOutcome, dict[str, float]]:
    """The outcome and per-question signal of a :func:`rung_report`."""
    fields = json.loads(report)
    return TrialOutcome.from_json(fields["outcome"]), fields["per_question"]


def signal_attr(rung: int) -> str:
    """The Optuna trial attribute that holds its signal at ``rung``: ``{"resolution": r,
    "per_question": {question id: value}}``."""
    return f"rung_{rung}_signal"


_COMPARED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
)


class RungPruner(optuna.pruners.BasePruner):
    """Asynchronous successive halving at every rung a trial reports, stopping only clear losers.

    At each report a trial is judged at the furthest rung it shares with another trial (complete,
    pruned or running): its latest, or, when no other trial has reached that one yet, the latest
    where one has. Judged at its latest rung alone, a trial that got to each rung first (trials
    started together run in step, a few seconds apart) would never meet a rival and would run to
    the end, so what is saved would depend on who was a few seconds ahead. It stops there when
    (1) its value is not among the best ``1 / reduction_factor`` of the values reported at that
    rung, itself included (while fewer than ``reduction_factor`` have, when it is not the best),
    as Optuna's SuccessiveHalvingPruner decides at its rungs; and (2) over the questions both
    signals read, it trails the rung's best trial by a mean paired difference that exceeds the
    signal's resolution by more than ``noise_z`` standard errors of that difference (a one-sided
    test that the gap is larger than what matters; ``noise_z`` 0: (1) alone). Without
    per-question values to pair (a study stored before them), (1) decides.

    Optuna's own pruner places rungs where the step doubles (1, 2, 4, ... with a reduction factor
    of 2); here every reported step is a rung, wherever the spec put it in training."""

    def __init__(self, reduction_factor: int, noise_z: float = 0.0) -> None:
        self.reduction_factor = reduction_factor
        self.noise_z = noise_z

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if trial.last_step is None:
            return False
        if not math.isfinite(trial.intermediate_values[trial.last_step]):
            return True
        # A trial that failed after a rung is no standard: beside it every other could stop.
        others = [
            other
            for other in study.get_trials(deepcopy=False, states=_COMPARED)
            if other.number != trial.number
        ]
        shared = [
            rung
            for rung in trial.intermediate_values
            if any(rung in other.intermediate_values for other in others)
        ]
        if not shared:
            return False
        rung = max(shared)
        rivals = [other for other in others if rung in other.intermediate_values]
        value = trial.intermediate_values[rung]
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        competing = sorted(
            [value, *(other.intermediate_values[rung] for other in rivals)], reverse=maximize
        )  # best first
        kept = max(1, len(competing) // self.reduction_factor)
        worst_kept = competing[kept - 1]
        if not (value < worst_kept if maximize else value > worst_kept):
            return False
        best = (max if maximize else min)(rivals, key=lambda other: other.intermediate_values[rung])
        return self._trails_beyond_noise(trial, best, rung, maximize)

    def _trails_beyond_noise(
        self,
        trial: optuna.trial.FrozenTrial,
        best: optuna.trial.FrozenTrial,
        rung: int,
        maximize: bool,
    ) -> bool:
        """Whether ``trial`` trails ``best`` at ``rung`` by more than the signal's resolution plus
        ``noise_z`` standard errors of their paired per-question difference (True where there is
        nothing to pair)."""
        signal = trial.user_attrs.get(signal_attr(rung)) or {}
        mine: dict[str, float] | None = signal.get("per_question")
        theirs: dict[str, float] | None = (best.user_attrs.get(signal_attr(rung)) or {}).get(
            "per_question"
        )
        if self.noise_z == 0 or not mine or not theirs:
            return True
        shared = sorted(set(mine) & set(theirs))
        gaps = [
            (theirs[question] - mine[question]) * (1 if maximize else -1) for question in shared
        ]
        if len(gaps) < 2:
            return True
        standard_error = statistics.stdev(gaps) / math.sqrt(len(gaps))
        resolution = float(signal.get("resolution", 0.0))
        return bool(statistics.fmean(gaps) - resolution > self.noise_z * standard_error)


def stage_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner of every stage study of ``spec``'s launch."""
    early_stopping = spec.search.early_stopping
    if early_stopping is None:
        return optuna.pruners.NopPruner()  # a trial reports once, at its end
    return RungPruner(early_stopping.reduction_factor, early_stopping.noise_z)


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
