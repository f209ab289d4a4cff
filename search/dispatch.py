"""Run a study's plan stage by stage through Ray Tune, with Optuna as the searcher.

This module translates: a plan stage becomes one ``tune.Tuner`` run whose searcher is an
``OptunaSearch`` bound to the stage's study; a trial's metrics and record become Optuna user
attributes. Decisions (which stages, which grid points, what is reused) come from ``search.plan``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from search.plan import Plan, Stage, grid_points, make_plan
from search.spec import StudySpec, trial_config
from search.store import (
    LAUNCH_ATTR,
    LaunchOwner,
    best_trial,
    check_not_running,
    check_spec_matches,
    claim_studies,
    existing_stage_study,
    fail_abandoned_trials,
    fail_running_trials,
    finished_params,
    heartbeat_studies,
    objective_values,
    open_stage_study,
    open_storage,
    record_trial,
    release_studies,
    stage_study_name,
    trial_attrs,
    waiting_params,
)
from trainers.errors import ConfigError, RagsweepError, one_line

__all__ = ["LaunchSummary", "StageEvent", "launch"]

_PAYLOAD = "ragsweep_payload"  # the result key carrying a trial's metrics and record as JSON


@dataclass(frozen=True)
class StageEvent:
    """What the progress view is told: a stage started, a trial started or ended, a stage ended."""

    kind: str  # "stage", "trial_start", "trial_end", "stage_end"
    stage: Stage
    n_trials: int = 0  # trials this launch runs in the stage ("stage" events)
    failed: bool = False
    objective: float | None = None


@dataclass
class LaunchSummary:
    """Trials run, skipped (already complete) and failed per stage, and wall time.

    ``abandoned`` counts trials an earlier, dead launch left RUNNING, failed by this one;
    ``blocked`` names the stages not run because a stage they build on has no completed trial.
    """

    ran: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
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
    max_retries: int = 0,
    log_to_driver: bool = False,
    heartbeat_s: float = 30.0,
) -> LaunchSummary:
    """Run every stage of ``spec``'s plan that still has work; completed trials are kept.

    A second launch of the same spec is refused while this one runs; trials a dead launch left
    RUNNING are failed (retryable) and their points run again.
    """
    started = time.perf_counter()
    # Tune runs each trial in its own working directory: relative paths would land there.
    runs_dir, cache_dir = runs_dir.resolve(), cache_dir.resolve()
    plan = make_plan(spec)
    storage = open_storage(storage_url)
    check_spec_matches(storage, spec)
    existing = {
        stage.name: existing_stage_study(storage, spec, stage.name) for stage in plan.stages
    }
    check_not_running([study for study in existing.values() if study is not None])
    notify = on_event or _ignore
    summary = LaunchSummary()
    if not any(_has_work(stage, spec, existing[stage.name]) for stage in plan.stages):
        summary.skipped = {stage.name: stage.n_trials for stage in plan.stages}
        summary.wall_s = time.perf_counter() - started
        return summary
    # Data, models and the Ray cluster are checked before anything is written, so bad input
    # leaves the database as it was.
    _prepare_shared(spec, plan, cache_dir)
    try:
        _start_ray(address, log_to_driver)
        _check_resources(spec)
        studies = {stage.name: open_stage_study(storage, spec, stage.name) for stage in plan.stages}
        _run_claimed(
            spec,
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
    finally:
        ray.shutdown()  # stops a local Ray; only disconnects from a cluster given by address
    summary.wall_s = time.perf_counter() - started
    return summary


def _run_claimed(
    spec: StudySpec,
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
    """Run the stages while this launch holds the studies; fail what a dead launch left running."""
    previous = {name: study.user_attrs.get(LAUNCH_ATTR) for name, study in studies.items()}
    owner = LaunchOwner.this_process()
    claim_studies(list(studies.values()), owner)
    heartbeat = _Heartbeat(list(studies.values()), owner, heartbeat_s)
    heartbeat.start()
    try:
        for name, study in studies.items():
            summary.abandoned[name] = len(fail_abandoned_trials(study, previous[name]))
        for stage in plan.stages:
            points = _remaining_points(stage, spec, studies[stage.name])
            summary.skipped[stage.name] = stage.n_trials - len(points)
            notify(StageEvent("stage", stage, n_trials=len(points)))
            blocked = _blocked_by(stage, plan, spec, studies)
            if points and blocked:
                # Stages that do not build on the failed one still run; this one waits for a
                # relaunch after the cause is fixed.
                summary.blocked[stage.name] = blocked
            elif points:
                job = _stage_job(stage, plan, spec, studies, runs_dir, cache_dir)
                summary.ran[stage.name] = len(points)
                summary.failed[stage.name] = _run_stage(
                    stage,
                    spec,
                    storage,
                    studies[stage.name],
                    points,
                    job,
                    notify,
                    max_retries,
                    runs_dir,
                )
                _prune_checkpoints(stage, plan, studies[stage.name])
            notify(StageEvent("stage_end", stage))
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


def _has_work(stage: Stage, spec: StudySpec, study: optuna.Study | None) -> bool:
    """Points still to run, or trials a dead launch left RUNNING (to be marked failed)."""
    if _remaining_points(stage, spec, study):
        return True
    running = (optuna.trial.TrialState.RUNNING,)
    return study is not None and bool(study.get_trials(deepcopy=False, states=running))


def _remaining_points(
    stage: Stage, spec: StudySpec, study: optuna.Study | None
) -> list[dict[str, float]]:
    """Grid points (or sampler budget) of the stage that no finished trial covers yet."""
    done = finished_params(study) if study is not None else []
    if spec.search.sampler == "grid" or not stage.searched:
        return [point for point in grid_points(stage, spec) if point not in done]
    return [{} for _ in range(max(0, stage.n_trials - len(done)))]  # the sampler picks the points


def _stage_job(
    stage: Stage,
    plan: Plan,
    spec: StudySpec,
    studies: dict[str, optuna.Study],
    runs_dir: Path,
    cache_dir: Path,
) -> dict[str, Any]:
    """Everything a trial of this stage needs besides its searched rates, as plain data."""
    fixed: dict[str, float] = {}
    for rate, source in stage.fixed_from.items():
        fixed[rate] = _best_record(studies[source], source)["config"][rate]
    reuse = {
        phase: str(Path(_best(studies[source], source).user_attrs["checkpoint"]) / phase)
        for phase, source in stage.reuse_from.items()
    }
    keeps_checkpoints = any(stage.name in later.reuse_from.values() for later in plan.stages)
    return {
        "spec": spec.model_dump(mode="json"),
        "stage": stage.name,
        "method": stage.method,
        "training_overrides": stage.training_overrides,
        "fixed": fixed,
        "reuse": reuse,
        "cache_dir": str(cache_dir),
        "out_dir": str(runs_dir / stage_study_name(spec, stage.name))
        if keeps_checkpoints
        else None,
        "cpus": spec.resources.cpus,
    }


def _blocked_by(
    stage: Stage, plan: Plan, spec: StudySpec, studies: dict[str, optuna.Study]
) -> str | None:
    """Why ``stage`` cannot run: a stage it takes a rate or checkpoint from has no completed
    trial, or has points still to run (trials Ray stopped), so its best is not known yet."""
    for source in sorted({*stage.fixed_from.values(), *stage.reuse_from.values()}):
        study_name = studies[source].study_name
        if best_trial(studies[source]) is None:
            return (
                f"stage '{source}', which it builds on, has no completed trial; see "
                f"`ragsweep trials {study_name}` for why, fix it and launch again"
            )
        unfinished = len(_remaining_points(plan.stage(source), spec, studies[source]))
        if unfinished:
            # Building on the best of part of a grid would fix a choice a relaunch cannot revisit.
            return (
                f"stage '{source}', which it builds on, has {unfinished} trial(s) stopped before "
                f"they finished (`ragsweep trials {study_name} --state fail` says why); launch "
                "again to run them first"
            )
    return None


def _best(study: optuna.Study, stage_name: str) -> optuna.trial.FrozenTrial:
    best = best_trial(study)
    if best is None:
        raise ConfigError(
            f"stage '{stage_name}' has no completed trial to build on (all failed); see `ragsweep trials` "
            "for the reasons, fix them and launch again"
        )
    return best


def _best_record(study: optuna.Study, stage_name: str) -> dict[str, Any]:
    return _best(study, stage_name).user_attrs["record"]


def _run_stage(
    stage: Stage,
    spec: StudySpec,
    storage: optuna.storages.RDBStorage,
    study: optuna.Study,
    points: list[dict[str, float]],
    job: dict[str, Any],
    notify: Callable[[StageEvent], None],
    max_retries: int,
    runs_dir: Path,
) -> int:
    """One Tune run over the stage's remaining points; returns how many trials failed."""
    study_name = study.study_name
    if spec.search.sampler == "grid":
        # Points a killed launch enqueued but never started are still queued; Optuna's
        # skip_if_exists would also skip points whose trial failed, so they would never re-run.
        queued = waiting_params(study)
        for point in points:
            if point and point not in queued:
                study.enqueue_trial(point)
    ranges = {
        "lr_embedder": spec.search.lr_embedder_range,
        "lr_generator": spec.search.lr_generator_range,
    }
    if spec.search.sampler == "grid":
        ranges = {
            rate: (min(getattr(spec.search, rate)), max(getattr(spec.search, rate)))
            for rate in stage.searched
        }

    objectives = [objective.metric for objective in spec.objectives]
    searcher = _RecordingOptunaSearch(
        space=_Space(stage.searched, ranges, job["fixed"]),
        metric=objectives,
        mode=["max" if o.direction == "maximize" else "min" for o in spec.objectives],
        sampler=_sampler(spec),
        study_name=study_name,
        storage=storage,
    )
    progress = _ProgressCallback(stage, notify, objectives[0])
    resources = {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_run_trial, job=job), resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=len(points),
            max_concurrent_trials=spec.concurrency,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=study_name.replace("/", "__"),
            storage_path=str((runs_dir / "ray").resolve()),
            verbose=0,
            callbacks=[progress],
            failure_config=tune.FailureConfig(max_failures=max_retries),
        ),
    )
    try:
        tuner.fit()
    except KeyboardInterrupt:
        fail_running_trials(
            study,
            "the launch was interrupted (Ctrl-C) before the trial finished; launching the spec "
            "again re-runs it",
        )
        raise
    except Exception as e:
        # Tune gives up on a whole stage for some cluster faults (Ray's memory monitor killing a
        # trial's actor while it starts); its unfinished trials fail, retryable, and the study
        # goes on, as for any other failed trial.
        reason = (
            f"Ray stopped this stage before the trial finished ({one_line(e)}); "
            "launching the spec again re-runs it"
        )
        return progress.failed + len(fail_running_trials(study, reason))
    return progress.failed


def _sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    if spec.search.sampler == "tpe" and len(spec.objectives) == 1:
        return optuna.samplers.TPESampler(seed=spec.seed)
    if spec.search.sampler == "tpe":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    # grid: every point is enqueued, so the sampler only fills parameters nobody enqueued (none).
    return optuna.samplers.RandomSampler(seed=spec.seed)


@dataclass(frozen=True)
class _Space:
    """Define-by-run space: the searched rates on a log scale, plus the fixed ones as constants."""

    searched: tuple[str, ...]
    ranges: dict[str, tuple[float, float]]
    fixed: dict[str, float]

    def __call__(self, trial: optuna.Trial) -> dict[str, float]:
        for rate in self.searched:
            trial.suggest_float(rate, *self.ranges[rate], log=True)
        return dict(self.fixed)


class _RecordingOptunaSearch(OptunaSearch):
    """OptunaSearch that stores each trial's metrics and record, and failures with their reason.

    Tune's OptunaSearch keeps only objective values and logs (then drops) a failing ``tell``;
    here every reported figure becomes a user attribute and nothing is swallowed.
    """

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        payload = json.loads(result[_PAYLOAD]) if result and _PAYLOAD in result else {}
        reported_failure = payload.get("fail_reason")
        values = (
            None if reported_failure else objective_values(payload.get("metrics", {}), self._metric)
        )
        if values is None:
            payload["fail_reason"] = reported_failure or (
                "the trial worker died before reporting (killed, out of memory or a lost node)"
                if error
                else f"the trial reported no finite value for {', '.join(self._metric)}"
            )
            # A failure the trial reported recurs on a re-run; a dead worker may not.
            payload["retryable"] = not reported_failure
        try:
            record_trial(ot_trial, payload)
            self._tell(ot_trial, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another launch took this one for dead and failed the trial: keep the result as a
            # trial of its own rather than lose it.
            self._ot_study.add_trial(_finished_copy(ot_trial, payload, values))
        self._completed_trials.add(trial_id)

    def _tell(self, ot_trial: optuna.Trial, values: list[float] | None) -> None:
        if values is None:
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        else:
            self._ot_study.tell(ot_trial, values)


def _finished_copy(
    trial: optuna.Trial, payload: dict[str, Any], values: list[float] | None
) -> optuna.trial.FrozenTrial:
    """A finished trial with ``trial``'s parameters and what it reported."""
    return optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL if values is None else optuna.trial.TrialState.COMPLETE,
        params=trial.params,
        distributions=trial.distributions,
        values=values,
        user_attrs=trial_attrs(payload),
    )


class _ProgressCallback(tune.Callback):
    """Turns Tune's trial events into :class:`StageEvent` for the progress view."""

    def __init__(self, stage: Stage, notify: Callable[[StageEvent], None], objective: str) -> None:
        self._stage, self._notify, self._objective = stage, notify, objective
        self.failed = 0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the live view stays in the driver.
        return {**self.__dict__, "_notify": _ignore}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._notify(StageEvent("trial_start", self._stage))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        payload = json.loads(trial.last_result.get(_PAYLOAD, "{}"))
        failed = bool(payload.get("fail_reason"))
        self.failed += failed
        value = None if failed else payload.get("metrics", {}).get(self._objective)
        self._notify(StageEvent("trial_end", self._stage, failed=failed, objective=value))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        self._notify(StageEvent("trial_end", self._stage, failed=True))


def _ignore(event: StageEvent) -> None:
    """The progress sink of an unpickled callback: no live view there."""


def _run_trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """The Tune trainable: one trainers trial; failures are reported with their reason, not raised."""
    import torch

    from trainers import run_trial

    torch.set_num_threads(max(1, int(job["cpus"])))  # one thread per requested CPU
    payload: dict[str, Any] = {
        "method": job["method"],
        "stage": job["stage"],
        "node": ray.get_runtime_context().get_node_id(),
    }
    try:
        spec = StudySpec.model_validate(job["spec"])
        if job["training_overrides"]:
            spec = spec.model_copy(
                update={"training": spec.training.model_copy(update=job["training_overrides"])}
            )
        rates = {**job["fixed"], **config}
        trial = trial_config(
            spec,
            job["method"],
            lr_embedder=rates.get("lr_embedder"),
            lr_generator=rates.get("lr_generator"),
            reuse=job["reuse"],
        )
        out_dir = (
            Path(job["out_dir"]) / tune.get_context().get_trial_id() if job["out_dir"] else None
        )
        result = run_trial(trial, cache_dir=Path(job["cache_dir"]), out_dir=out_dir)
        payload |= {
            "metrics": result.metrics,
            "record": result.record,
            "checkpoint": str(out_dir) if out_dir else None,
        }
    except RagsweepError as e:
        payload["fail_reason"] = str(e)
    except (
        Exception
    ) as e:  # a bug or a library error: recorded as the trial's failure, study goes on
        payload["fail_reason"] = one_line(e)
    _release_memory()
    tune.report(
        {
            _PAYLOAD: json.dumps(payload),
            **{k: v for k, v in payload.get("metrics", {}).items() if "." not in k},
        }
    )


def _release_memory() -> None:
    """Hand a finished trial's memory back to the OS: the worker is reused for the next trial, and
    glibc keeps freed model and activation memory otherwise (measured: a worker grew from 4.3 to
    9.0 GiB over three SmolLM2 trials)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _prepare_shared(spec: StudySpec, plan: Plan, cache_dir: Path) -> None:
    """Check data against every stage, convert built-in models and build the frozen index once,
    before trials race to do it (a mistake found here fails the launch, not every trial)."""
    import torch

    from trainers.data import load_data
    from trainers.index import build_index
    from trainers.methods import needs_context_labels
    from trainers.models import load_embedder, load_generator
    from trainers.trial import resolve_device

    resolve_device(spec.training.device)
    device = torch.device("cpu")
    data = load_data(spec.data)
    if spec.training.k > len(data.corpus):
        raise ConfigError(
            f"training.k is {spec.training.k} but the corpus has only {len(data.corpus)} "
            "documents; lower training.k"
        )
    for stage in plan.stages:
        training = spec.training.model_copy(update=stage.training_overrides)
        if needs_context_labels(stage.method, training) and not data.has_context_labels:
            raise ConfigError(
                f"method '{stage.method}' trains the embedder on context labels, but the training "
                "questions have no gold documents; drop it from methods (use two_phase, rag_token "
                "or rag_sequence) or provide gold_doc_ids"
            )
    embedder = load_embedder(spec.models.embedder, cache_dir=cache_dir, device=device)
    build_index(
        embedder, data.corpus, cache_dir=cache_dir, max_length=spec.training.embedder_max_length
    )
    if spec.models.generator_finetune != "qlora":
        load_generator(spec.models.generator, cache_dir=cache_dir, device=device, finetune="full")


def _start_ray(address: str | None, log_to_driver: bool) -> None:
    # A failed trial reports its reason and no objective; Tune must pass that on to the searcher,
    # which records it as FAIL, instead of rejecting the result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's own Ctrl-C handler ends the stage's run as if it were done, and the launch would go
    # on to the next stage; without it, Ctrl-C stops the whole launch.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    if ray.is_initialized():
        return
    try:
        if address is None:
            # Local Ray stays on loopback and keeps its dashboard off.
            ray.init(
                include_dashboard=False,
                log_to_driver=log_to_driver,
                logging_level=logging.ERROR,
                _node_ip_address="127.0.0.1",
            )
        else:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"cannot connect to the Ray cluster at '{address}': {one_line(e)}; start it with `ray start --head` or drop --address"
        ) from e


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on: ray.init would retry it for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(
            f"no Ray cluster answers at '{address}' ({one_line(e)}); start it with "
            "`ray start --head` there, fix --address, or drop --address for a local Ray"
        ) from e


def _check_resources(spec: StudySpec) -> None:
    """Refuse a trial size no Ray node can hold: Tune would wait for it forever."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for key, name in (("CPU", "cpus"), ("GPU", "gpus")):
        asked = getattr(spec.resources, name)
        largest = max((node.get(key, 0.0) for node in nodes), default=0.0)
        if asked > largest:
            raise ConfigError(
                f"resources.{name} is {asked:g} per trial but the largest Ray node has "
                f"{largest:g} {key}s; lower resources.{name} or add a node that has them"
            )


def _prune_checkpoints(stage: Stage, plan: Plan, study: optuna.Study) -> None:
    """Keep only the best trial's models of a stage that later stages reuse."""
    if not any(stage.name in later.reuse_from.values() for later in plan.stages):
        return
    best = best_trial(study)
    for trial in study.get_trials(deepcopy=False):
        checkpoint = trial.user_attrs.get("checkpoint")
        if checkpoint and (best is None or trial.number != best.number):
            shutil.rmtree(checkpoint, ignore_errors=True)
