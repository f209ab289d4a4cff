"""Run a study's plan through Ray Tune, with Optuna as the searcher.

This module translates: a launch is one ``tune.Tuner`` run whose searcher
(:class:`search.launch._scheduler.StagedSearch`) starts each plan stage once the stages it builds on are
done and hands out its points through the stage's Optuna study; a trial's metrics and record become
Optuna user attributes. Decisions (which stages, which grid points, what is reused) come from
``search.plan``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune

from search.launch._cluster import check_resources, ray_session, start_ray
from search.launch._lease import (
    LAUNCH_ATTR,
    LaunchOwner,
    check_not_running,
    claim_studies,
    fail_abandoned_trials,
    heartbeat_studies,
    release_studies,
)
from search.launch._memory_kills import MemoryKillReports, memory_kills_as_actor_deaths
from search.launch._optuna_search import unreachable
from search.launch._pruning import RungStops
from search.launch._scheduler import (
    STAGE_KEY,
    StagedSearch,
    StageEvent,
    ignore_event,
)
from search.launch._stage_results import remaining_points
from search.launch._test_scoring import start_stage_leads
from search.launch._trainable import make_trainable
from search.launch.encode import EncodeProgress, encode_on_cluster
from search.plan import Plan, Stage, make_plan
from search.spec import StudySpec
from search.store import (
    check_spec_matches,
    database_exists,
    existing_stage_study,
    fail_running_trials,
    open_stage_study,
    open_storage,
)
from trainers import RagsweepError, VectorDtype, one_line

__all__ = ["LaunchSummary", "StageEvent", "launch", "prepare_study"]


@dataclass
class LaunchSummary:
    """Trials run, skipped (already complete) and failed per stage, and wall time.

    ``abandoned`` counts trials an earlier, dead launch left RUNNING, failed by this one;
    ``blocked`` names the stages not run because a stage they build on has no completed trial.
    """

    ran: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    pruned: dict[str, int] = field(default_factory=dict)  # stopped early by early stopping
    abandoned: dict[str, int] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


def launch(
    spec: StudySpec,
    *,
    storage_url: str,
    runs_dir: Path,
    cache_dir: Path,
    address: str | None = None,
    on_event: Callable[[StageEvent], None] | None = None,
    max_retries: int = 1,
    log_to_driver: bool = False,
    heartbeat_s: float = 30.0,
    on_ready: Callable[[], None] | None = None,
    on_encode: Callable[[EncodeProgress], None] | None = None,
) -> LaunchSummary:
    """Run every stage of ``spec``'s plan that still has work; completed trials are kept.

    A second launch of the same spec is refused while this one runs; trials a dead launch left
    RUNNING are failed (retryable) and their points run again. ``on_ready`` is called once every
    check has passed, before anything is written (a launch with bad input writes nothing).
    It starts a local Ray (or connects to ``address``) unless this process is already connected
    to one, and leaves running a Ray it did not start. A corpus whose vectors are not cached is
    encoded on the cluster first (``on_encode`` hears how far it is).
    """
    started = time.perf_counter()
    # The database is storage_url; the spec's own URL, which may hold a password, goes no further
    # (Tune pickles what it is given into the runs folder).
    spec = spec.model_copy(update={"storage": None})
    # Tune runs each trial in its own working directory: relative paths would land there.
    runs_dir, cache_dir = runs_dir.resolve(), cache_dir.resolve()
    # The stages only: forecasts wait for the prompts' fill, which the preflight measures.
    plan = make_plan(spec, forecast=False)
    # A new SQLite file is created only once every check has passed.
    storage = open_storage(storage_url) if database_exists(storage_url) else None
    if storage is not None:
        check_spec_matches(storage, spec)
    existing = {
        stage.name: existing_stage_study(storage, spec, stage.name) if storage else None
        for stage in plan.stages
    }
    check_not_running([study for study in existing.values() if study is not None])
    notify = on_event or ignore_event
    summary = LaunchSummary()
    if not any(_has_work(stage, spec, existing[stage.name]) for stage in plan.stages):
        summary.skipped = {stage.name: stage.n_trials for stage in plan.stages}
        summary.wall_s = time.perf_counter() - started
        return summary
    with ray_session():
        # Data, models and the Ray cluster are checked before anything is written, so bad input
        # leaves the database as it was.
        fill = prepare_study(
            spec,
            plan,
            cache_dir,
            connect=lambda: start_ray(address, log_to_driver),
            on_encode=on_encode,
        )
        # Trials run with the data's own prompt fill: it sizes the memory each asks Ray for, and
        # each trial sizes its RAG forwards by it. The studies keep the spec as it was given.
        trial_spec = _with_prompt_fill(spec, fill)
        plan = make_plan(trial_spec)
        start_ray(address, log_to_driver)
        check_resources(trial_spec, plan)
        if on_ready is not None:
            on_ready()
        storage = storage or open_storage(storage_url)
        studies = {stage.name: open_stage_study(storage, spec, stage.name) for stage in plan.stages}
        _run_claimed(
            spec,
            trial_spec,
            plan,
            storage,
            studies,
            runs_dir,
            cache_dir,
            notify,
            max_retries,
            heartbeat_s,
            summary,
        )
    summary.wall_s = time.perf_counter() - started
    return summary


def _run_claimed(
    spec: StudySpec,
    trial_spec: StudySpec,
    plan: Plan,
    storage: optuna.storages.RDBStorage,
    studies: dict[str, optuna.Study],
    runs_dir: Path,
    cache_dir: Path,
    notify: Callable[[StageEvent], None],
    max_retries: int,
    heartbeat_s: float,
    summary: LaunchSummary,
) -> None:
    """Run the stages while this launch holds the studies; fail what a dead launch left running.
    Trials get ``trial_spec``: ``spec`` with what the launch measured filled in."""
    previous = {name: study.user_attrs.get(LAUNCH_ATTR) for name, study in studies.items()}
    owner = LaunchOwner.this_process()
    claim_studies(list(studies.values()), owner)
    heartbeat = _Heartbeat(list(studies.values()), owner, heartbeat_s)
    heartbeat.start()
    try:
        for name, study in studies.items():
            summary.abandoned[name] = len(fail_abandoned_trials(study, previous[name]))
        points = {
            stage.name: remaining_points(stage, spec, studies[stage.name]) for stage in plan.stages
        }
        summary.skipped = {
            stage.name: stage.n_trials - len(points[stage.name]) for stage in plan.stages
        }
        search = StagedSearch(plan, spec, storage, studies, points, notify)
        if search.has_work:
            stage_leads = start_stage_leads(spec, studies)
            trainable = make_trainable(trial_spec, plan, runs_dir, cache_dir, stage_leads)
            starts = _TrialStarts(plan, notify)
            try:
                _run_tuner(spec, trainable, search, starts, studies, max_retries, runs_dir)
            finally:
                if stage_leads is not None:
                    # A worker process, not kept for the next launch; Ray may be gone with the run.
                    with contextlib.suppress(Exception):
                        ray.kill(stage_leads)
        summary.ran = dict(search.started)
        summary.failed = {name: search.failed[name] for name in search.started}
        summary.pruned = {name: search.pruned[name] for name in search.started}
        summary.blocked = dict(search.blocked)
        for name in search.unfinished():
            summary.blocked[name] = "the launch stopped before the stage finished; launch again"
    finally:
        heartbeat.stop()
        release_studies(studies.values(), owner)


class _Heartbeat(threading.Thread):
    """Refreshes the launch's claim on its studies, so other hosts can tell it is alive."""

    def __init__(self, studies: list[optuna.Study], owner: LaunchOwner, interval_s: float) -> None:
        super().__init__(name="ragsweep-heartbeat", daemon=True)
        self._studies, self._owner, self._interval_s = studies, owner, interval_s
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                heartbeat_studies(self._studies, self._owner)
            except Exception:  # a missed beat only matters after minutes; the next one retries
                logging.getLogger(__name__).debug("heartbeat write failed", exc_info=True)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _with_prompt_fill(spec: StudySpec, fill: float | None) -> StudySpec:
    """``spec`` with ``training.prompt_fill`` set to ``fill``, unless the spec sets it itself."""
    if fill is None or spec.training.prompt_fill is not None:
        return spec
    training = spec.training.model_copy(update={"prompt_fill": fill})
    return spec.model_copy(update={"training": training})


def _has_work(stage: Stage, spec: StudySpec, study: optuna.Study | None) -> bool:
    """Points still to run, or trials a dead launch left RUNNING (to be marked failed)."""
    if remaining_points(stage, spec, study):
        return True
    running = (optuna.trial.TrialState.RUNNING,)
    return study is not None and bool(study.get_trials(deepcopy=False, states=running))


def _run_tuner(
    spec: StudySpec,
    trainable: Any,
    search: StagedSearch,
    starts: _TrialStarts,
    studies: dict[str, optuna.Study],
    max_retries: int,
    runs_dir: Path,
) -> None:
    """Tune runs over every stage's remaining points until none is left. A trial whose worker dies
    (killed for memory, SIGKILL, a lost node) runs again under its Optuna trial, up to
    ``max_retries`` times, and after a memory kill with fewer trials at once; the trials beside it
    go on. When Tune gives up on a whole run, its running trials count as such deaths and a new
    run goes on."""
    search.max_retries = max_retries
    while search.trials_left:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=search,
                # An upper bound, re-runs included: stages found blocked give back their share
                # (the searcher says FINISHED once every stage is done or blocked).
                num_samples=search.trials_left * (max_retries + 1),
                # The searcher keeps the limit, and lowers it after a memory kill.
                max_concurrent_trials=spec.concurrency,
                scheduler=RungStops(search.killed_for_memory, search.rung_reported)
                if spec.search.early_stopping
                else MemoryKillReports(search.killed_for_memory),
                # One pool of warm trial workers for the whole launch, every stage included.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str((runs_dir / "ray").resolve()),
                verbose=0,
                callbacks=[starts],
                # The searcher re-runs dead workers' trials, once a slot is free; Tune would at once.
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        try:
            with memory_kills_as_actor_deaths():
                tuner.fit()
            return
        except KeyboardInterrupt:
            _fail_running(
                studies,
                "the launch was interrupted (Ctrl-C) before the trial finished; launching the "
                "spec again re-runs it",
            )
            raise
        except Exception as e:
            # Tune gave up on the whole run (a fault of Ray's or Tune's own, not of one trial):
            # the trials it was running stopped as if their workers had died.
            reason = (
                f"Ray stopped the launch's run before the trial finished ({one_line(e)}); "
                "launching the spec again re-runs it, from its last resume point if it saved one"
            )
            if not search.stop_in_flight(reason):
                _fail_running(studies, reason)  # re-runs still waiting for a slot
                raise RagsweepError(f"Ray stopped the launch: {one_line(e)}") from e


def _fail_running(studies: dict[str, optuna.Study], reason: str) -> None:
    """Fail (retryable, with ``reason``) the RUNNING trials of every stage."""
    for study in studies.values():
        try:
            fail_running_trials(study, reason)
        except Exception as e:
            if not unreachable(e):
                raise
            break  # the database is away: the next launch fails these trials (retryable)


class _TrialStarts(tune.Callback):
    """Tells the progress view when a trial starts (the searcher tells when one ends)."""

    def __init__(self, plan: Plan, notify: Callable[[StageEvent], None]) -> None:
        self._plan, self._notify = plan, notify

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the live view stays in the driver.
        return {**self.__dict__, "_notify": ignore_event}

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._notify(StageEvent("trial_start", self._plan.stage(trial.config[STAGE_KEY])))


def prepare_study(
    spec: StudySpec,
    plan: Plan,
    cache_dir: Path,
    *,
    connect: Callable[[], None],
    workers: int | None = None,
    shard_passages: int | None = None,
    on_encode: Callable[[EncodeProgress], None] | None = None,
    convert_generator: bool = True,
) -> float | None:
    """Check the data against every stage, convert built-in models, encode the corpus on the Ray
    cluster ``connect`` joins (where its vectors are not cached and it has more than one shard)
    and build the frozen index once, before trials race to do it (a mistake found here fails the
    launch, not every trial). Returns the data's prompt fill (:func:`trainers.prepare`)."""
    from trainers import prepare

    stage_trainings = [
        (stage.method, spec.training.model_copy(update=stage.training_overrides))
        for stage in plan.stages
    ]

    def encode(embedder: Any, corpus: Any, max_length: int, dtype: VectorDtype) -> None:
        encode_on_cluster(
            embedder,
            corpus,
            max_length,
            dtype=dtype,
            data=spec.data,
            models=spec.models,
            cache_dir=cache_dir,
            connect=connect,
            workers=workers,
            shard_passages=shard_passages,
            on_progress=on_encode,
        )

    return prepare(
        spec.data,
        spec.models,
        stage_trainings,
        cache_dir=cache_dir,
        encoder=encode,
        convert_generator=convert_generator,
    )
