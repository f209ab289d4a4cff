"""What a stage's study says about it: the points it has left, whether a stage that builds on it
can start, the best trial it hands on, and which checkpoints it keeps."""

from __future__ import annotations

import shutil

import optuna

from search.plan import Plan, Stage, grid_points
from search.spec import StudySpec
from search.store import TrialRecord, best_trial, finished_params, read_trials
from trainers import ConfigError

__all__ = [
    "best_to_build_on",
    "blocked_by",
    "checkpoint",
    "keep_best_checkpoint",
    "remaining_points",
    "stage_best",
]


def remaining_points(
    stage: Stage, spec: StudySpec, study: optuna.Study | None
) -> list[dict[str, float]]:
    """Grid points (or sampler budget) of the stage that no finished trial covers yet."""
    done = finished_params(study) if study is not None else []
    if spec.search.sampler == "grid" or not stage.searched:
        return [point for point in grid_points(stage, spec) if point not in done]
    return [{} for _ in range(max(0, stage.n_trials - len(done)))]  # the sampler picks the points


def blocked_by(
    stage: Stage, plan: Plan, spec: StudySpec, studies: dict[str, optuna.Study]
) -> str | None:
    """Why ``stage`` cannot run: a stage it takes a rate or checkpoint from has no completed
    trial, or has points still to run (trials Ray stopped), so its best is not known yet."""
    for source in sorted({*stage.fixed_from.values(), *stage.reuse_from.values()}):
        study_name = studies[source].study_name
        if stage_best(studies[source], spec) is None:
            return (
                f"stage '{source}', which it builds on, has no completed trial; see "
                f"`ragsweep trials {study_name}` for why, fix it and launch again"
            )
        unfinished = len(remaining_points(plan.stage(source), spec, studies[source]))
        if unfinished:
            # Building on the best of part of a grid would fix a choice a relaunch cannot revisit.
            return (
                f"stage '{source}', which it builds on, has {unfinished} trial(s) stopped before "
                f"they finished (`ragsweep trials {study_name} --state fail` says why); launch "
                "again to run them first"
            )
    return None


def stage_best(study: optuna.Study, spec: StudySpec) -> TrialRecord | None:
    """The stage's best trial on the spec's first objective (:func:`search.store.best_trial`)."""
    first = spec.objectives[0]
    return best_trial(read_trials(study), first.metric, maximize=first.direction == "maximize")


def best_to_build_on(study: optuna.Study, stage_name: str, spec: StudySpec) -> TrialRecord:
    """The stage's best trial, which later stages take rates and models from."""
    found = stage_best(study, spec)
    if found is None:
        raise ConfigError(
            f"stage '{stage_name}' has no completed trial to build on (all failed or stopped early); see `ragsweep trials` "
            "for the reasons, fix them and launch again"
        )
    return found


def checkpoint(trial: TrialRecord) -> str:
    """Where ``trial``'s models are, for a later stage to load."""
    if trial.checkpoint is None:
        raise ConfigError(
            f"trial {trial.id}, whose models a later stage reuses, saved none; launch the spec "
            "again with a new name to train it anew"
        )
    return trial.checkpoint


def keep_best_checkpoint(stage: Stage, plan: Plan, spec: StudySpec, study: optuna.Study) -> None:
    """Keep only the best trial's models of a stage that later stages reuse."""
    if not any(stage.name in later.reuse_from.values() for later in plan.stages):
        return
    kept = stage_best(study, spec)
    for trial in read_trials(study):
        if trial.checkpoint and (kept is None or trial.number != kept.number):
            shutil.rmtree(trial.checkpoint, ignore_errors=True)
