"""The Tune trainable: what runs in a trial worker, and the resources each stage's trials ask of
Ray. A trial runs one :func:`trainers.run_trial` and reports a :class:`search.store.TrialOutcome`
(its metrics and record, as JSON under :data:`search.launch._scheduler.OUTCOME_KEY`); a failure is
reported with its reason, never raised, so the study goes on; a full disk is reported as
retryable (it is the machine's fault, not the trial's).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray import tune

from search.forecast import trial_memory_ask
from search.launch._pruning import RUNG_KEY, rung_report
from search.launch._scheduler import OUTCOME_KEY, REUSE_KEY, STAGE_KEY
from search.launch._test_scoring import TestClaim
from search.plan import Plan
from search.spec import StudySpec, trial_config
from search.store import TrialOutcome, encode_questions, stage_study_name
from trainers import (
    RagsweepError,
    Resume,
    Rung,
    Rungs,
    TrialConfig,
    causes,
    discard_point,
    method_declarations,
    one_line,
    register_method,
)

__all__ = ["make_trainable"]


def make_trainable(
    spec: StudySpec, plan: Plan, runs_dir: Path, cache_dir: Path, stage_leads: Any = None
) -> Any:
    """The Tune trainable with what every trial needs besides its config, as plain data;
    ``stage_leads`` (:func:`search.launch._test_scoring.start_stage_leads`) decides which trials
    score the test split."""
    stages = {
        stage.name: {
            "method": stage.method,
            "training_overrides": stage.training_overrides,
            # Checkpoints are kept only where a later stage loads them.
            "out_dir": str(runs_dir / stage_study_name(spec, stage.name))
            if any(stage.name in later.reuse_from.values() for later in plan.stages)
            else None,
            # A stage of one trial has none to stop it against: its signals would cost for nothing.
            "rungs": spec.search.early_stopping is not None and stage.n_trials > 1,
        }
        for stage in plan.stages
    }
    job = {
        "spec": spec.model_dump(mode="json"),
        "stages": stages,
        "cache_dir": str(cache_dir),
        "runs_dir": str(runs_dir),
        "cpus": spec.resources.cpus,
        # Methods registered in the driver after import (register_method) travel with the job:
        # a worker process knows only the built-in ones.
        "methods": method_declarations(),
        "stage_leads": stage_leads,
    }
    # Per stage: memory is the stage's forecast peak (or resources.memory), so Ray starts a
    # trial only where it fits and queues it otherwise, instead of starting it and killing it.
    bundles = {
        stage.name: {
            "CPU": spec.resources.cpus,
            "GPU": spec.resources.gpus,
            "memory": trial_memory_ask(stage, spec) or 0,
        }
        for stage in plan.stages
    }

    def resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        return tune.PlacementGroupFactory([bundles[config[STAGE_KEY]]])

    return tune.with_resources(tune.with_parameters(_run_trial, job=job), resources)


def _run_trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """The Tune trainable: one trainers trial; failures are reported with their reason, not raised."""
    import torch

    from trainers import run_trial

    torch.set_num_threads(max(1, int(job["cpus"])))  # one thread per requested CPU
    stage = job["stages"][config[STAGE_KEY]]
    outcome = TrialOutcome(
        method=stage["method"],
        stage=config[STAGE_KEY],
        node=ray.get_runtime_context().get_node_id(),
    )
    out_dir: Path | None = None
    resume: Resume | None = None
    stopped = False
    test_claim = (
        TestClaim(job["stage_leads"], config[STAGE_KEY], tune.get_context().get_trial_id())
        if job["stage_leads"] is not None
        else None
    )
    try:
        for declaration in job["methods"]:
            register_method(declaration)
        spec = StudySpec.model_validate(job["spec"])
        if stage["training_overrides"]:
            spec = spec.model_copy(
                update={"training": spec.training.model_copy(update=stage["training_overrides"])}
            )
        trial = trial_config(
            spec,
            stage["method"],
            lr_embedder=config.get("lr_embedder"),
            lr_generator=config.get("lr_generator"),
            reuse=json.loads(config[REUSE_KEY]),
        )
        out_dir = (
            Path(stage["out_dir"]) / tune.get_context().get_trial_id() if stage["out_dir"] else None
        )
        resume = _resume(spec, config[STAGE_KEY], trial, Path(job["runs_dir"]))
        result = run_trial(
            trial,
            cache_dir=Path(job["cache_dir"]),
            out_dir=out_dir,
            # Stopped at a rung, the trial is stored with its config (its rates, fixed ones too).
            rungs=_rungs(spec, replace(outcome, record={"config": trial.model_dump(mode="json")}))
            if stage["rungs"]
            else None,
            # A relaunch on a machine without the earlier stages' checkpoints trains them again.
            train_missing_reuse=True,
            score_test=test_claim,
            resume=resume,
        )
        outcome = replace(
            outcome,
            metrics=result.metrics,
            record=result.record,
            checkpoint=str(out_dir) if out_dir else None,
            per_question=encode_questions(result.questions),
        )
    except SystemExit as e:
        if e.code not in (0, None):
            raise  # not Tune's stop
        # Tune stopped the trial at a rung (the report raises SystemExit(0) in a trial it stops);
        # the launch stores it pruned. Its models are no use to anyone.
        stopped = True
    except Exception as e:  # the trial's failure, stored with its reason; the study goes on
        if _no_space(e):
            # The machine's fault, not the trial's: once space is freed the trial runs through.
            where = job["runs_dir"] if out_dir else getattr(e, "filename", None) or "the disk"
            reason = f"no space left on device ({one_line(e)}); free space in {where} and relaunch"
            outcome = outcome.failed(reason, retryable=True)
        else:
            reason = str(e) if isinstance(e, RagsweepError) else one_line(e)
            outcome = replace(outcome, fail_reason=reason)
    if outcome.fail_reason and test_claim is not None:
        test_claim.release()  # a failed trial is never its stage's best
    if resume is not None and (stopped or (outcome.fail_reason and not outcome.retryable)):
        # Never run again: a stopped trial is stored pruned, and this failure would recur.
        discard_point(resume)
    if (outcome.fail_reason or stopped) and out_dir is not None:
        # No stage loads a failed or stopped trial's models, and a half-written checkpoint holds
        # the space the next trials need.
        shutil.rmtree(out_dir, ignore_errors=True)
    _release_memory()
    if stopped:
        raise SystemExit(0)  # how Tune's worker thread ends a stopped trial
    # Tune's flat metrics (no dots: Tune reads them as nested keys) are for its logs; the launch
    # stores the outcome.
    flat_metrics = {k: v for k, v in (outcome.metrics or {}).items() if "." not in k}
    tune.report({OUTCOME_KEY: outcome.to_json(), **flat_metrics})


def _resume(spec: StudySpec, stage: str, trial: TrialConfig, runs_dir: Path) -> Resume | None:
    """Where the trial keeps its resume points: a folder per stage and config, so that the run of
    the same point a relaunch starts (the earlier one failed as abandoned) finds them."""
    config_hash = hashlib.sha256(trial.model_dump_json().encode()).hexdigest()[:16]
    folder = runs_dir / stage_study_name(spec, stage) / f"resume-{config_hash}"
    if spec.resume_every_minutes is None:
        # Points turned off after a run kept one (its trial failed as retryable): this run
        # starts over, and nothing would ever delete that point.
        discard_point(Resume(folder))
        return None
    return Resume(folder, every_s=60 * spec.resume_every_minutes)


def _rungs(spec: StudySpec, outcome: TrialOutcome) -> Rungs | None:
    """With early stopping, where the trial takes its signal and how it reports it: each rung
    goes to Tune as the outcome the trial has if it stops there; Tune's scheduler decides."""
    early_stopping = spec.search.early_stopping
    if early_stopping is None:
        return None

    def report(rung: Rung) -> None:
        stopped_here = replace(outcome, metrics=rung.metrics, pruned_at=rung.summary())
        tune.report({RUNG_KEY: rung_report(stopped_here, rung.per_question)})

    return Rungs(tuple(early_stopping.rungs), early_stopping.questions, report)


def _no_space(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a write that found the disk full."""
    return any(
        (isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT))
        # safetensors and other native writers report the OS error in their message only.
        or "No space left on device" in str(seen)
        or "Disk quota exceeded" in str(seen)
        for seen in causes(error)
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
