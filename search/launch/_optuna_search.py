"""The Optuna seam: one stage's trials asked of and told to its Optuna study.

Translates only. Tune's trial ids become Optuna trials (``Study.ask``, an enqueued grid point
first), and each trial's outcome is told back (``Study.tell``) with everything it reported stored
through :func:`search.store.record_trial`; a failure is stored with its reason, never dropped.
Which stage runs, and when, is :mod:`search.launch._scheduler`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from search.plan import Stage
from search.spec import StudySpec
from search.store import TrialOutcome, record_trial, trial_attrs

OUTCOME_KEY = "ragsweep_payload"  # the result key carrying a trial's TrialOutcome as JSON


class StageSearch:
    """Hands out a stage's points as Optuna trials of its study and stores how each ended."""

    def __init__(self, study: optuna.Study, space: _Space, objectives: Sequence[str]) -> None:
        self._study, self._space, self._objectives = study, space, list(objectives)
        self._trials: dict[str, optuna.Trial] = {}  # Tune trial id -> its Optuna trial
        self._values: dict[str, list[float] | None] = {}  # ended: objective values, None failed

    def suggest(self, trial_id: str) -> dict[str, float]:
        """The config of a new Optuna trial (a queued grid point, else the sampler's pick)."""
        if trial_id not in self._trials:
            self._trials[trial_id] = self._study.ask()
        return self._space(self._trials[trial_id])

    def retry(self, dead_trial_id: str, trial_id: str) -> dict[str, float]:
        """The config of ``dead_trial_id``'s Optuna trial, handed out again as ``trial_id``: the
        re-run of a trial whose worker died reports to the same Optuna trial."""
        self._trials[trial_id] = self._trials.pop(dead_trial_id)
        return self.suggest(trial_id)

    def complete_trial(
        self,
        trial_id: str,
        result: dict[str, Any] | None = None,
        error: bool = False,
        death: str | None = None,
    ) -> list[float] | None:
        """Store the trial's outcome in its study; its objective values (None: failed).
        ``death``: why its worker died, where known."""
        if trial_id in self._values:
            return self._values[trial_id]
        trial = self._trials[trial_id]
        reported = (
            TrialOutcome.from_json(result[OUTCOME_KEY])
            if result and OUTCOME_KEY in result
            else TrialOutcome()
        )
        values = (
            None
            if reported.fail_reason
            else _objective_values(reported.metrics or {}, self._objectives)
        )
        outcome = reported
        if values is None:
            # A failure the trial reported recurs on a re-run; a dead worker may not.
            outcome = reported.failed(
                reported.fail_reason or _unreported_failure(error, death, self._objectives),
                retryable=not reported.fail_reason,
            )
        try:
            record_trial(trial, outcome)
            if values is None:
                self._study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self._study.tell(trial, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another launch took this one for dead and failed the trial: keep the result as a
            # trial of its own rather than lose it.
            self._study.add_trial(_finished_copy(trial, outcome, values))
        self._values[trial_id] = values
        return values


@dataclass(frozen=True)
class _Space:
    """Define-by-run space: the searched rates on a log scale, plus the fixed ones as constants."""

    searched: tuple[str, ...]
    ranges: dict[str, tuple[float, float]]
    fixed: dict[str, float]

    def __call__(self, trial: optuna.Trial) -> dict[str, float]:
        suggested = {
            rate: trial.suggest_float(rate, *self.ranges[rate], log=True) for rate in self.searched
        }
        return suggested | self.fixed


def stage_search(
    stage: Stage,
    spec: StudySpec,
    storage: optuna.storages.BaseStorage,
    study: optuna.Study,
    points: list[dict[str, float]],
    fixed: dict[str, float],
) -> StageSearch:
    """The stage's search over its study, its grid points enqueued."""
    if spec.search.sampler == "grid":
        # Points a killed launch enqueued but never started are still queued; Optuna's
        # skip_if_exists would also skip points whose trial failed, so they would never re-run.
        queued = _waiting_params(study)
        for point in points:
            if point and point not in queued:
                study.enqueue_trial(point)
        ranges = {
            rate: (min(getattr(spec.search, rate)), max(getattr(spec.search, rate)))
            for rate in stage.searched
        }
    else:
        ranges = {
            "lr_embedder": spec.search.lr_embedder_range,
            "lr_generator": spec.search.lr_generator_range,
        }
    sampling = optuna.load_study(
        study_name=study.study_name,
        storage=storage,
        sampler=_sampler(spec),
        pruner=optuna.pruners.NopPruner(),  # a trial reports once, at its end
    )
    objectives = [objective.metric for objective in spec.objectives]
    return StageSearch(sampling, _Space(stage.searched, ranges, fixed), objectives)


def _unreported_failure(error: bool, death: str | None, objectives: Sequence[str]) -> str:
    """Why a trial that reported no failure of its own failed."""
    if error:
        return (
            death or "the trial worker died before reporting (killed, out of memory or a lost node)"
        )
    return f"the trial reported no finite value for {', '.join(objectives)}"


def _objective_values(
    metrics: Mapping[str, float], objectives: Sequence[str]
) -> list[float] | None:
    """The objective values from a trial's metrics; None when one is missing or not finite."""
    values = [metrics.get(name) for name in objectives]
    if any(value is None or value != value or abs(value) == float("inf") for value in values):
        return None
    return [float(value) for value in values]  # type: ignore[arg-type]


def _sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    if spec.search.sampler == "tpe" and len(spec.objectives) == 1:
        return optuna.samplers.TPESampler(seed=spec.seed)
    if spec.search.sampler == "tpe":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    # grid: every point is enqueued, so the sampler only fills parameters nobody enqueued (none).
    return optuna.samplers.RandomSampler(seed=spec.seed)


def _waiting_params(study: optuna.Study) -> list[dict[str, Any]]:
    """Parameters of enqueued trials no launch has started yet (a killed launch leaves some)."""
    # "fixed_params" is where Study.enqueue_trial keeps a queued point (Optuna reads it there too).
    return [
        trial.system_attrs.get("fixed_params", {})
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    ]


def _finished_copy(
    trial: optuna.Trial, outcome: TrialOutcome, values: list[float] | None
) -> optuna.trial.FrozenTrial:
    """A finished trial with ``trial``'s parameters and what it reported."""
    return optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL if values is None else optuna.trial.TrialState.COMPLETE,
        params=trial.params,
        distributions=trial.distributions,
        values=values,
        user_attrs=trial_attrs(outcome),
    )
