"""The Optuna seam: one stage's trials asked of and told to its Optuna study.

Translates only. Tune's trial ids become Optuna trials (``Study.ask``, an enqueued grid point
first), and each trial's outcome is told back (``Study.tell``) with everything it reported stored
through :func:`search.store.record_trial`; a failure is stored with its reason, never dropped.
Each ask and tell may be tried again after a lost connection (:class:`DatabaseWait`) and does
its work once. Which stage runs, and when, is :mod:`search.launch._scheduler`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import optuna

from search.launch._pruning import read_rung_report, signal_attr, stage_pruner
from search.plan import Stage
from search.spec import StudySpec
from search.store import StorageError, TrialOutcome, mask_url, record_trial, trial_attrs
from trainers import causes, one_line

OUTCOME_KEY = "ragsweep_payload"  # the result key carrying a trial's TrialOutcome as JSON
# How long a launch waits for its database to come back (a PostgreSQL server restarting or failing
# over, a network cut, a SQLite file locked past its busy timeout) before it stops. Shorter than
# the lease's staleness (search.launch._lease, 300 s): while it waits, its heartbeat is at most
# this plus one beat old, so a launch on another host does not take its studies for abandoned.
DATABASE_WAIT_S = 240.0
_T = TypeVar("_T")


class StageSearch:
    """Hands out a stage's points as Optuna trials of its study and stores how each ended."""

    def __init__(self, study: optuna.Study, space: _Space, objectives: Sequence[str]) -> None:
        self._study, self._space, self._objectives = study, space, list(objectives)
        self._trials: dict[str, optuna.Trial] = {}  # Tune trial id -> its Optuna trial
        self._values: dict[str, list[float] | None] = {}  # ended: objective values, None failed
        self._pruned: dict[str, TrialOutcome] = {}  # Tune trial id -> its outcome where it stopped
        self._asking = False  # an ask is under way (True after one that raised)

    def suggest(self, trial_id: str) -> dict[str, float]:
        """The config of a new Optuna trial (a queued grid point, else the sampler's pick)."""
        if trial_id not in self._trials:
            # Optuna's ask marks a queued point's trial RUNNING before it reads the study and
            # writes the parameters: an ask cut short by a lost connection leaves that trial
            # RUNNING with no Tune trial. The next ask takes it rather than the next point.
            unclaimed = self._unclaimed_trial() if self._asking else None
            self._asking = True
            self._trials[trial_id] = unclaimed or self._study.ask()
            self._asking = False
        return self._space(self._trials[trial_id])

    def retry(self, dead_trial_id: str, trial_id: str) -> dict[str, float]:
        """The config of ``dead_trial_id``'s Optuna trial, handed out again as ``trial_id``: the
        re-run of a trial whose worker died reports to the same Optuna trial."""
        if dead_trial_id in self._trials:  # not yet moved by a try cut short
            self._trials[trial_id] = self._trials.pop(dead_trial_id)
        return self.suggest(trial_id)

    def report_rung(self, trial_id: str, payload: str) -> bool:
        """Store a rung signal (``payload``: the :data:`RUNG_KEY` of its report) as the Optuna
        trial's intermediate value at that rung; whether the stage's pruner stops the trial."""
        trial = self._trials[trial_id]
        outcome, per_question = read_rung_report(payload)
        rung = outcome.pruned_at or {}
        # Stored before the value: the pruner pairs this trial with others over the questions.
        trial.set_user_attr(
            signal_attr(int(rung["rung"])),
            {"resolution": rung.get("resolution", 0.0), "per_question": per_question},
        )
        trial.report(float(rung["value"]), step=int(rung["rung"]))
        if trial.should_prune():
            self._pruned[trial_id] = outcome
            return True
        return False

    def pruned(self, trial_id: str) -> TrialOutcome | None:
        """The outcome of ``trial_id`` if the stage's pruner stopped it, else None."""
        return self._pruned.get(trial_id)

    def complete_trial(
        self,
        trial_id: str,
        result: dict[str, Any] | None = None,
        error: bool = False,
        death: str | None = None,
    ) -> list[float] | None:
        """Store the trial's outcome in its study; its objective values (None: failed or pruned).
        ``death``: why its worker died, where known."""
        if trial_id in self._values:
            return self._values[trial_id]
        trial = self._trials[trial_id]
        if trial_id in self._pruned:
            # Stopped at a rung: stored PRUNED with its cost up to there and the rung.
            self._store(trial, self._pruned[trial_id], None)
            self._values[trial_id] = None
            return None
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
            # A failure the trial reported recurs on a re-run unless it says otherwise (a full
            # disk); a dead worker may not.
            outcome = reported.failed(
                reported.fail_reason or _unreported_failure(error, death, self._objectives),
                retryable=bool(reported.retryable) if reported.fail_reason else True,
            )
        self._store(trial, outcome, values)
        self._values[trial_id] = values
        return values

    def _store(
        self, trial: optuna.Trial, outcome: TrialOutcome, values: list[float] | None
    ) -> None:
        """Record ``outcome`` and tell the trial finished: with ``values``, failed without, or
        pruned when the outcome says where it stopped."""
        try:
            record_trial(trial, outcome)
            self._study.tell(trial, values, state=_state(outcome, values))
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another launch took this one for dead and failed the trial: keep the result as a
            # trial of its own rather than lose it. (Or a tell whose answer a lost connection
            # cut off had been stored: nothing to add.)
            if not self._stored_as(trial, outcome, values):
                self._study.add_trial(_finished_copy(trial, outcome, values))

    def _stored_as(
        self, trial: optuna.Trial, outcome: TrialOutcome, values: list[float] | None
    ) -> bool:
        """Whether ``trial`` is stored finished with ``outcome`` and ``values`` already."""
        stored = next(t for t in self._study.get_trials(deepcopy=False) if t.number == trial.number)
        return (
            stored.state == _state(outcome, values)
            and (values is None or stored.values == values)
            and all(stored.user_attrs.get(k) == v for k, v in trial_attrs(outcome).items())
        )

    def _unclaimed_trial(self) -> optuna.Trial | None:
        """A RUNNING trial of the study that no Tune trial runs: one an ask cut short took. The
        launch holds the study, and failed every trial left RUNNING before it, so it is this
        launch's own."""
        claimed = {trial.number for trial in self._trials.values()}
        running = (optuna.trial.TrialState.RUNNING,)
        for frozen in self._study.get_trials(deepcopy=False, states=running):
            if frozen.number not in claimed:
                # Optuna has no public way from a FrozenTrial to a Trial that can be suggested.
                return optuna.Trial(self._study, frozen._trial_id)
        return None


class DatabaseWait:
    """Runs the launch's reads and writes of its study database through an outage: while the
    database cannot be reached each one is tried again, for up to ``wait_s`` from the outage's
    start. ``on_change(error, wait_s)`` is told once when an outage begins, and
    ``on_change(None, seconds it lasted)`` once when it ends. Past ``wait_s`` the database is
    lost: :class:`search.store.StorageError`, then and on every later call, at once.

    Only a call that may be tried again belongs here: one that does its work once however often
    it is cut short (Optuna rolls a failed transaction back; :class:`StageSearch` asks and tells
    so)."""

    def __init__(
        self, url: str, wait_s: float, on_change: Callable[[str | None, float], None]
    ) -> None:
        self._url, self.wait_s, self._on_change = url, wait_s, on_change
        self._down_since: float | None = None  # time.monotonic() of the outage's first failure
        self.lost: str | None = None  # why the database was given up, once it was

    def __call__(self, operation: Callable[[], _T]) -> _T:
        self.check()
        pause_s = 0.5
        while True:
            try:
                result = operation()
            except Exception as e:
                if not unreachable(e):
                    raise
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                    self._on_change(one_line(_first_cause(e)), self.wait_s)
                left_s = self._down_since + self.wait_s - now
                if left_s <= 0:
                    self.lost = (
                        f"lost the database {mask_url(self._url)} (unreachable for "
                        f"{_duration(self.wait_s)}: {one_line(_first_cause(e))}), every "
                        "completed trial stored; relaunch when it is back"
                    )
                    raise StorageError(self.lost) from e
                time.sleep(min(pause_s, left_s))
                pause_s = min(2 * pause_s, 10.0)
                continue
            if self._down_since is not None:
                self._on_change(None, time.monotonic() - self._down_since)
                self._down_since = None
            return result

    def check(self) -> None:
        """Raise :class:`search.store.StorageError` if the database was lost."""
        if self.lost is not None:
            raise StorageError(self.lost)


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached for now: a connection refused or
    cut, a lock held past the busy timeout (DB-API's OperationalError, as SQLAlchemy raises it or
    Optuna wraps it in its StorageInternalError)."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    return any(
        isinstance(seen, (OperationalError, InterfaceError))
        or (isinstance(seen, DBAPIError) and seen.connection_invalidated)
        for seen in causes(error)
    )


def _first_cause(error: BaseException) -> BaseException:
    """The driver's own error under SQLAlchemy's and Optuna's wrappers (its message says why)."""
    from sqlalchemy.exc import DBAPIError

    drivers = (
        seen.orig
        for seen in causes(error)
        if isinstance(seen, DBAPIError) and isinstance(seen.orig, BaseException)
    )
    return next(drivers, error)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.3g} min" if seconds >= 60 else f"{seconds:.3g} s"


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
        for point in _run_order(points, spec):
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
        sampler=stage_sampler(spec, stage.n_trials),
        pruner=stage_pruner(spec),
    )
    objectives = [objective.metric for objective in spec.objectives]
    return StageSearch(sampling, _Space(stage.searched, ranges, fixed), objectives)


def _run_order(points: list[dict[str, float]], spec: StudySpec) -> list[dict[str, float]]:
    """The order a stage runs its grid points in: the spec's, or with early stopping the most
    promising rates first. Successive halving stops a trial that trails those that reached its
    rung before it, so it saves most when strong rates come first; in the listed, rising order
    every trial of a generator grid would beat those before it and none would stop. The order
    decides only how much is saved, never the pick: a trial stops only when it trails beyond
    noise."""
    if spec.search.early_stopping is None:
        return points
    return sorted(
        points, key=lambda point: -sum(_promise(rate, value, spec) for rate, value in point.items())
    )


def _promise(rate: str, value: float, spec: StudySpec) -> float:
    """How likely a learning rate is to be its grid's best, before anything ran. A LoRA adapter
    starts at zero, so in a few epochs its small rates leave the model as it was (the paper's
    1e-8 .. 1e-6): larger first. A model fine-tuned in full (the embedder always) starts
    pretrained, and a large rate on little data undoes that (PopQA's ft_embed at 1e-4: Recall@5
    and F1 below no training): smaller first."""
    adapter = rate == "lr_generator" and spec.models.generator_finetune != "full"
    return math.log(value) if adapter else -math.log(value)


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


def stage_sampler(spec: StudySpec, budget: int) -> optuna.samplers.BaseSampler:
    """The sampler of a stage that runs ``budget`` trials."""
    if spec.search.sampler == "tpe":
        # TPE (one objective or several: Optuna's TPE is MOTPE then) samples at random until
        # n_startup_trials have run, 10 by default; a stage's budget is about 10 trials, so it
        # would be random search. A third of the budget explores, the rest is modelled.
        return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=max(1, budget // 3))
    # grid: every point is enqueued, so the sampler only fills parameters nobody enqueued (none).
    return optuna.samplers.RandomSampler(seed=spec.seed)


def _waiting_params(study: optuna.Study) -> list[dict[str, Any]]:
    """Parameters of enqueued trials no launch has started yet (a killed launch leaves some)."""
    # "fixed_params" is where Study.enqueue_trial keeps a queued point (Optuna reads it there too).
    return [
        trial.system_attrs.get("fixed_params", {})
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    ]


def _state(outcome: TrialOutcome, values: list[float] | None) -> optuna.trial.TrialState:
    """How a trial with ``outcome`` and objective ``values`` ended, in Optuna's terms."""
    if outcome.pruned_at is not None:
        return optuna.trial.TrialState.PRUNED
    return optuna.trial.TrialState.FAIL if values is None else optuna.trial.TrialState.COMPLETE


def _finished_copy(
    trial: optuna.Trial, outcome: TrialOutcome, values: list[float] | None
) -> optuna.trial.FrozenTrial:
    """A finished trial with ``trial``'s parameters and what it reported."""
    return optuna.trial.create_trial(
        state=_state(outcome, values),
        params=trial.params,
        distributions=trial.distributions,
        values=values,
        user_attrs=trial_attrs(outcome),
    )
