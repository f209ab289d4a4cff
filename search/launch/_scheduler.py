"""Which trial runs next: one Tune searcher for a whole launch, over every stage of its plan.

A stage starts once the stages it builds on are done, so stages that do not depend on each other
share the launch's slots (none, ft_embed and ft_gen at once; rag_token beside rag_sequence). Free
slots go to ready stages in :attr:`search.plan.Plan.start_order`. Each started stage hands out its
points through its own Optuna study (:class:`search.launch._optuna_search.StageSearch`), which
records every trial's metrics, record and failure reason. A trial whose worker died runs again
under its Optuna trial once a slot is free; after Ray's memory monitor killed one, the launch runs
fewer trials at once. While the database cannot be reached, the trials go on and each read and
write of it waits (:class:`search.launch._optuna_search.DatabaseWait`); once it is lost for good,
the launch stops.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import optuna
from ray.tune.search import Searcher

from search.launch._optuna_search import (
    DATABASE_WAIT_S,
    OUTCOME_KEY,
    DatabaseWait,
    StageSearch,
    stage_search,
)
from search.launch._stage_results import (
    best_to_build_on,
    blocked_by,
    checkpoint,
    keep_best_checkpoint,
)
from search.plan import Plan, Stage
from search.spec import StudySpec
from search.store import StorageError

__all__ = [
    "OUTCOME_KEY",
    "REUSE_KEY",
    "STAGE_KEY",
    "StageEvent",
    "StagedSearch",
    "ignore_event",
]

# Keys a trial's config carries besides its learning rates (no "/": Tune reads it as nesting).
STAGE_KEY = "ragsweep_stage"
REUSE_KEY = "ragsweep_reuse"  # phase -> checkpoint folder, as JSON
_T = TypeVar("_T")


@dataclass(frozen=True)
class StageEvent:
    """What the progress view is told: a stage started, a trial started or ended, a stage ended;
    the database became unreachable while the launch read or wrote the stage's study, or came back."""

    kind: str  # "stage", "trial_start", "trial_end", "stage_end", "database_down", "database_back"
    stage: Stage
    n_trials: int = 0  # trials this launch runs in the stage ("stage" events)
    failed: bool = False
    objective: float | None = None
    blocked: str | None = None  # why the stage does not run ("stage_end" events)
    database_error: str | None = None  # why it cannot be reached ("database_down" events)
    pruned_at: dict[str, Any] | None = None  # a trial stopped early: its rung ("trial_end")
    # "database_down": how long the launch waits for it; "database_back": how long it was away.
    wait_s: float = 0.0


class StagedSearch(Searcher):
    """Hands out the trials of every stage whose dependencies are done, each through its stage's
    Optuna study; returns FINISHED once every stage is done or blocked."""

    # How long a read or write of the database may wait for it to come back (class-wide: tests
    # of a lost database shorten it).
    database_wait_s = DATABASE_WAIT_S

    def __init__(
        self,
        plan: Plan,
        spec: StudySpec,
        storage: optuna.storages.BaseStorage,
        studies: dict[str, optuna.Study],
        points: dict[str, list[dict[str, float]]],
        notify: Callable[[StageEvent], None],
    ) -> None:
        # Tune takes a list per argument for several objectives; its annotation says str.
        super().__init__(**_metric_and_mode(spec))  # type: ignore[arg-type]
        self._plan, self._spec, self._storage, self._studies = plan, spec, storage, studies
        self._points, self._notify = points, notify
        self._searches: dict[str, StageSearch] = {}  # started stages
        self._suggested = {name: 0 for name in points}
        self._finished = {name: 0 for name in points}
        self._reuse: dict[str, str] = {}  # stage -> its trials' REUSE_KEY value
        self._trial_stage: dict[str, str] = {}  # Tune trial id -> stage
        # A trial whose worker died runs again under its Optuna trial, up to max_retries times,
        # once fewer than max_concurrent trials run (lowered by each memory kill).
        self.max_retries = 0
        self.max_concurrent: int | None = None  # None: Tune sets no limit
        self._retries: list[tuple[str, str]] = []  # (stage, Tune trial id of the dead try)
        self._deaths: dict[str, int] = {}  # Tune trial id -> its point's dead tries before it
        self._memory_kills: dict[str, str] = {}  # Tune trial id -> Ray's message
        self.started: dict[str, int] = {}  # stage -> trials this launch runs in it
        self.blocked: dict[str, str] = {}  # stage -> why it does not run
        self.failed = {name: 0 for name in points}  # stage -> trials that ended failed
        self.pruned = {name: 0 for name in points}  # stage -> trials early stopping stopped
        self._done: set[str] = set()
        url = str(getattr(storage, "url", ""))
        self._database = DatabaseWait(url, self.database_wait_s, self._database_changed)
        self._database_stage = plan.stages[0]  # the stage whose study the database call is for
        self._start_ready()

    @property
    def has_work(self) -> bool:
        """Some stage has started with trials to run."""
        return any(self.started.values())

    @property
    def trials_left(self) -> int:
        """Trials not handed out yet, those of stages not started and re-runs included (an upper
        bound)."""
        return len(self._retries) + sum(
            len(points) - self._suggested[name]
            for name, points in self._points.items()
            if name not in self.blocked
        )

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its searcher into the run folder (tuner.pkl, the experiment state) for a
        # restore of its own, which a launch never uses (a relaunch resumes from the database):
        # the live view stays in the driver, and the database handles, whose URL may hold a
        # password, stay out.
        database = ("_storage", "_studies", "_searches", "_database")
        state = {key: value for key, value in self.__dict__.items() if key not in database}
        return state | {"_notify": ignore_event}

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any
    ) -> bool:
        return True  # the stages' spaces are their own; Tune passes no param_space

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        # Tune's max_concurrent_trials, kept here rather than in Tune's ConcurrencyLimiter so that
        # a memory kill lowers it for the rest of the launch (a later Tune run passes it again).
        if self.max_concurrent is None or max_concurrent < self.max_concurrent:
            self.max_concurrent = max_concurrent
        return True

    # Searcher.FINISHED is a str, which Tune's annotation of suggest leaves out.
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        # A lost database ends Tune's run here: Tune hands an error raised when a trial ends to
        # that trial, but one raised here to its caller (search.launch.dispatch).
        self._database.check()
        if self.max_concurrent is not None and len(self._trial_stage) >= self.max_concurrent:
            return None
        if self._retries:  # before new points: stages may be waiting on it
            name, dead_trial_id = self._retries[0]
            search = self._searches[name]
            config = self._stored(name, partial(search.retry, dead_trial_id, trial_id))
            self._retries.pop(0)
            self._deaths[trial_id] = self._deaths.pop(dead_trial_id)
            self._trial_stage[trial_id] = name
            return {**config, STAGE_KEY: name, REUSE_KEY: self._reuse[name]}
        for name in self._plan.start_order:
            if name in self._searches and self._suggested[name] < len(self._points[name]):
                search = self._searches[name]
                config = self._stored(name, partial(search.suggest, trial_id))
                self._suggested[name] += 1
                self._trial_stage[trial_id] = name
                return {**config, STAGE_KEY: name, REUSE_KEY: self._reuse[name]}
        if self._trial_stage:
            return None  # trials still running: the stages waiting on them start when they end
        return Searcher.FINISHED

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        memory_kill = self._memory_kills.pop(trial_id, None)
        death = _memory_kill_reason(memory_kill) if memory_kill else None
        self._complete(trial_id, result, error, death)

    def killed_for_memory(self, trial_id: str, message: str) -> None:
        """Ray's memory monitor killed ``trial_id``'s worker (``message`` is Ray's): from now on,
        run one trial fewer at once than ran then (at least one), so its re-run has fewer beside
        it. Told before the trial's failure (:class:`search.launch._memory_kills.MemoryKillReports`)."""
        running = len(self._trial_stage)  # the killed trial included
        self.max_concurrent = max(1, min(self.max_concurrent or running, running) - 1)
        self._memory_kills[trial_id] = message

    def rung_reported(self, trial_id: str, payload: str) -> bool:
        """A trial's rung report (its :data:`search.launch._pruning.RUNG_KEY`), stored in its
        stage's study; whether the stage's pruner stops the trial there."""
        name = self._trial_stage.get(trial_id)
        if name is None:
            return False
        return self._stored(name, partial(self._searches[name].report_rung, trial_id, payload))

    def stop_in_flight(self, reason: str) -> int:
        """The trials handed out and not complete, after Tune gave up on their run: each runs
        again in the next run (its worker died), or, out of retries, fails with ``reason``
        (retryable). Stages they finish end; the next may start. Returns how many there were.
        Raises :class:`search.store.StorageError` once the database is lost: nothing can be
        stored, and the trials left RUNNING run again on a relaunch."""
        self._database.check()
        in_flight = list(self._trial_stage)
        for trial_id in in_flight:
            self._complete(trial_id, result=None, error=True, death=reason)
        return len(in_flight)

    def _complete(
        self, trial_id: str, result: dict[str, Any] | None, error: bool, death: str | None
    ) -> None:
        name = self._trial_stage.pop(trial_id, None)
        if name is None:
            return
        died = error and not (result and OUTCOME_KEY in result)  # no outcome reported
        deaths = self._deaths.pop(trial_id, 0) + died
        if died and deaths <= self.max_retries:
            self._deaths[trial_id] = deaths
            self._retries.append((name, trial_id))
            return
        search = self._searches[name]
        try:
            values = self._stored(
                name,
                lambda: search.complete_trial(trial_id, result=result, error=error, death=death),
            )
            # Told here, before the stages this trial's end lets start (Tune tells its callbacks
            # only after the searcher).
            pruned = search.pruned(trial_id)
            self._trial_ended(
                name,
                objective=None if values is None else values[0],
                pruned_at=dict(pruned.pruned_at or {}) if pruned else None,
            )
        except StorageError:
            if self._database.lost is None:
                raise
            # The database is lost: the trial stays RUNNING there, for a relaunch to run again,
            # and the next suggest ends the run.

    def _stored(self, name: str, operation: Callable[[], _T]) -> _T:
        """``operation`` on stage ``name``'s study, waiting out an outage of the database."""
        self._database_stage = self._plan.stage(name)
        return self._database(operation)

    def _database_changed(self, error: str | None, wait_s: float) -> None:
        kind = "database_down" if error else "database_back"
        self._notify(StageEvent(kind, self._database_stage, database_error=error, wait_s=wait_s))

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the stage studies are the state, and a relaunch resumes from them."""

    def unfinished(self) -> list[str]:
        """Stages that did not end (a Tune run stopped before they, or their sources, finished)."""
        return [name for name in self._points if name not in self._done]

    def _trial_ended(
        self, name: str, objective: float | None, pruned_at: dict[str, Any] | None = None
    ) -> None:
        """Count a trial of stage ``name`` as ended: stopped early at rung ``pruned_at``, else
        failed when ``objective`` is None."""
        failed = objective is None and pruned_at is None
        self.failed[name] += failed
        self.pruned[name] += pruned_at is not None
        stage = self._plan.stage(name)
        self._notify(
            StageEvent("trial_end", stage, failed=failed, objective=objective, pruned_at=pruned_at)
        )
        self._finished[name] += 1
        if self._finished[name] == len(self._points[name]):
            stage, study = self._plan.stage(name), self._studies[name]
            self._stored(name, lambda: keep_best_checkpoint(stage, self._plan, self._spec, study))
            self._end(name)
            self._start_ready()

    def _start_ready(self) -> None:
        """Start (or block) every waiting stage whose sources are done; repeat while that ends
        stages (a stage with nothing to run, or blocked, ends at once)."""
        changed = True
        while changed:
            changed = False
            for stage in self._plan.stages:
                waiting = stage.name not in self._done and stage.name not in self._searches
                if waiting and set(stage.depends_on) <= self._done:
                    self._start(stage)
                    changed = True

    def _start(self, stage: Stage) -> None:
        points = self._points[stage.name]
        if not points:
            self._notify(StageEvent("stage", stage, n_trials=0))
            self._end(stage.name)
            return
        blocked = self._stored(
            stage.name, lambda: blocked_by(stage, self._plan, self._spec, self._studies)
        )
        if blocked:
            # Stages that do not build on the failed one still run; this one waits for a relaunch
            # after the cause is fixed.
            self.blocked[stage.name] = blocked
            self._end(stage.name, blocked=blocked)
            return
        study = self._studies[stage.name]
        sources = sorted({*stage.fixed_from.values(), *stage.reuse_from.values()})
        best_trials = {
            source: self._stored(
                stage.name, partial(best_to_build_on, self._studies[source], source, self._spec)
            )
            for source in sources
        }
        fixed = {
            rate: best_trials[source].config[rate] for rate, source in stage.fixed_from.items()
        }
        reuse = {
            phase: str(Path(checkpoint(best_trials[source])) / phase)
            for phase, source in stage.reuse_from.items()
        }
        self._reuse[stage.name] = json.dumps(reuse)
        self._searches[stage.name] = self._stored(
            stage.name,
            lambda: stage_search(stage, self._spec, self._storage, study, points, fixed),
        )
        self.started[stage.name] = len(points)
        self._notify(StageEvent("stage", stage, n_trials=len(points)))

    def _end(self, name: str, blocked: str | None = None) -> None:
        self._done.add(name)
        self._notify(StageEvent("stage_end", self._plan.stage(name), blocked=blocked))


def _memory_kill_reason(message: str) -> str:
    """A trial's failure reason from Ray's memory-kill message (its first line)."""
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    return (
        f"Ray's memory monitor killed the trial worker ({first.rstrip('.')}); launching the spec "
        "again re-runs it; if it recurs, run fewer trials at once (--concurrency) or give each "
        "less to hold (training.rag_questions_per_forward)"
    )


def ignore_event(event: StageEvent) -> None:
    """The progress sink of an unpickled searcher or callback: no live view there."""


def _metric_and_mode(spec: StudySpec) -> dict[str, list[str]]:
    """Tune's ``metric`` and ``mode`` for the spec's objectives, in order."""
    return {
        "metric": [objective.metric for objective in spec.objectives],
        "mode": ["max" if o.direction == "maximize" else "min" for o in spec.objectives],
    }
