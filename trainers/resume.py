"""Resume points: a trial's training progress, saved as it goes, so that the same trial run again
after its process died (a launch stopped, a machine lost) continues from the last point instead of
training from the start.

A point holds what the trial has done: the trained phases it finished, and of the phase under way
its optimizer steps, the weights of the models its phases train, the optimizer and schedule, the
random number generators and its losses; or, evaluating, the questions answered so far; with the
rungs taken and what each phase has cost so far. It is one file, replaced atomically, read with
``weights_only=True``, and taken only by a trial whose config and data (its fingerprint) are those
of the one that wrote it. On CPU the continued trial ends with the weights and metrics of one
never stopped (tests/trainers/test_resume.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from trainers.config import TrialConfig
from trainers.cost import CostMeter, PhaseCost
from trainers.evaluate import Answered
from trainers.methods import Phase
from trainers.rungs import Rung

if TYPE_CHECKING:
    from trainers.pipeline import Pipeline

__all__ = [
    "PhaseProgress",
    "PointWriter",
    "Resume",
    "ResumePoint",
    "capture_random_state",
    "cost_before",
    "discard_point",
    "load_point",
    "restore_random_state",
    "restore_weights",
    "save_point",
    "trained_weights",
    "usable_point",
]

_FILE = "resume.pt"
_FORMAT = 3  # 3: with the data's fingerprint


@dataclass(frozen=True)
class Resume:
    """Where a trial keeps its resume point (a folder of its own), and how many seconds of
    training may pass between two points. A point is also saved at every rung and at the end of
    every trained phase."""

    folder: Path
    every_s: float = 600.0


@dataclass(frozen=True)
class PhaseProgress:
    """A training phase after ``step`` optimizer steps: enough to continue it in a new process
    (:func:`trainers.train.train_phase` makes one, and continues from one)."""

    step: int
    losses: list[float]
    weights: dict[
        str, dict[str, torch.Tensor]
    ]  # model ("embedder", "generator") -> its trained weights
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    random_state: dict[str, Any]


@dataclass(frozen=True)
class ResumePoint:
    """A trial's progress: the trained phases it finished (their final losses), the phase under
    way (a trained phase with its progress, "eval" or "test" with the questions answered so far;
    None between trained phases), what each phase has cost so far, and the rungs taken. Outside a
    trained phase, ``weights`` hold the models as the finished phases left them."""

    config: str  # the TrialConfig's JSON: a point continues only the trial that wrote it,
    data_fingerprint: str  # on the data it trained on (a data.path file may change in between)
    finished: dict[str, float | None]  # phase -> its final loss
    costs: dict[str, PhaseCost]  # phase -> its cost so far (the load and index phases left out)
    rungs: list[Rung] = field(default_factory=list)
    phase: str | None = None
    progress: PhaseProgress | None = None
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    answered: dict[str, Answered] = field(default_factory=dict)  # "eval", "test" -> so far


def trained_weights(
    pipeline: Pipeline, phases: Iterable[Phase]
) -> dict[str, dict[str, torch.Tensor]]:
    """CPU copies of the weights that training changes (those with ``requires_grad``) in each
    model one of ``phases`` trains: on a GPU the copy takes no device memory, and a frozen model
    (the embedder while the generator trains) is not copied at all."""
    models = _models(pipeline)
    names = {"embedder" for phase in phases if phase.trains_embedder} | {
        "generator" for phase in phases if phase.trains_generator
    }
    return {
        name: {
            key: weight.detach().to("cpu", copy=True)
            for key, weight in models[name].named_parameters()
            if weight.requires_grad
        }
        for name in sorted(names)
    }


def restore_weights(pipeline: Pipeline, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put ``weights`` (from :func:`trained_weights`) back into the pipeline's models."""
    models = _models(pipeline)
    for name, saved in weights.items():
        with torch.no_grad():
            for key, weight in models[name].named_parameters():
                if weight.requires_grad:
                    weight.copy_(saved[key])


def capture_random_state() -> dict[str, Any]:
    """The state of every random number generator training draws from (dropout draws from torch's)."""
    python_version, python_state, python_gauss = random.getstate()
    numpy_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return {
        "python": [python_version, list(python_state), python_gauss],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        # Only where this process uses CUDA: asking starts CUDA on every visible GPU, and a CPU
        # trial on a GPU node would hold device memory for nothing.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_random_state(state: dict[str, Any]) -> None:
    """Set every generator back to ``state`` (from :func:`capture_random_state`)."""
    python_version, python_state, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_state), python_gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # A trial run again may see fewer GPUs than the run that saved (another node, other
        # resources): a state for a device it lacks fails CUDA's start ("invalid device
        # ordinal"), so each GPU it has takes its own, and a point from a GPU run resumes on CPU.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def save_point(resume: Resume, point: ResumePoint) -> None:
    """Write ``point`` into the resume folder, replacing the last one in one step (a process
    killed while writing leaves the last point whole)."""
    resume.folder.mkdir(parents=True, exist_ok=True)
    progress = point.progress
    saved = {
        "format": _FORMAT,
        # The plain parts as JSON text: a weights_only load reads them without trusting classes.
        "point": json.dumps(
            {
                "config": point.config,
                "data_fingerprint": point.data_fingerprint,
                "finished": point.finished,
                "costs": {name: dataclasses.asdict(cost) for name, cost in point.costs.items()},
                "rungs": [dataclasses.asdict(rung) for rung in point.rungs],
                "phase": point.phase,
                "answered": {
                    split: dataclasses.asdict(answered)
                    for split, answered in point.answered.items()
                },
                "step": progress.step if progress else None,
                "losses": progress.losses if progress else None,
                "random_python": progress.random_state["python"] if progress else None,
                "random_numpy": progress.random_state["numpy"] if progress else None,
            }
        ),
        "weights": progress.weights if progress else point.weights,
        "optimizer": progress.optimizer if progress else None,
        "scheduler": progress.scheduler if progress else None,
        "random_torch": progress.random_state["torch"] if progress else None,
        "random_cuda": progress.random_state["cuda"] if progress else None,
    }
    partial = resume.folder / f".{_FILE}.{os.getpid()}"
    for stale in resume.folder.glob(f".{_FILE}.*"):
        if stale != partial:
            # Left by a process killed while it wrote (this trial's earlier run): as large as
            # a point, and never read.
            stale.unlink(missing_ok=True)
    try:
        torch.save(saved, partial)
        os.replace(partial, resume.folder / _FILE)
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk: free what the half-written point held
        raise


def load_point(resume: Resume, config_json: str, data_fingerprint: str) -> ResumePoint | None:
    """The point in the resume folder if the trial with ``config_json`` wrote it on the data with
    ``data_fingerprint``, else None."""
    path = resume.folder / _FILE
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != _FORMAT:
        return None
    plain = json.loads(saved["point"])
    if plain["config"] != config_json or plain["data_fingerprint"] != data_fingerprint:
        return None
    progress = None
    if plain["step"] is not None:
        progress = PhaseProgress(
            step=plain["step"],
            losses=plain["losses"],
            weights=saved["weights"],
            optimizer=saved["optimizer"],
            scheduler=saved["scheduler"],
            random_state={
                "python": plain["random_python"],
                "numpy": plain["random_numpy"],
                "torch": saved["random_torch"],
                "cuda": saved["random_cuda"],
            },
        )
    return ResumePoint(
        config=plain["config"],
        data_fingerprint=plain["data_fingerprint"],
        finished=plain["finished"],
        costs={name: PhaseCost(**cost) for name, cost in plain["costs"].items()},
        rungs=[Rung(**rung) for rung in plain["rungs"]],
        phase=plain["phase"],
        progress=progress,
        weights=saved["weights"],
        answered={split: Answered(**answered) for split, answered in plain["answered"].items()},
    )


def discard_point(resume: Resume) -> None:
    """Remove the resume folder (the trial finished, or was stopped for good), with any partial
    point an earlier run of the trial left when it was killed while writing."""
    shutil.rmtree(resume.folder, ignore_errors=True)


class PointWriter:
    """Saves a trial's resume points: after every rung, after ``resume.every_s`` of training
    since the last point, and at the end of every trained phase."""

    def __init__(
        self,
        resume: Resume,
        config: TrialConfig,
        data_fingerprint: str,
        pipeline: Pipeline,
        trained: list[Phase],
        meter: CostMeter,
        taken: list[Rung],
        final_losses: dict[str, float | None],
    ) -> None:
        self._resume, self._config_json = resume, config.model_dump_json()
        self._data_fingerprint = data_fingerprint
        self._pipeline, self._trained = pipeline, trained
        self._meter, self._taken, self._final_losses = meter, taken, final_losses
        self._saved_at, self._rungs_saved = time.monotonic(), len(taken)
        self._answered: dict[str, Answered] = {}  # evaluation splits answered whole

    def after_step(self, phase: str, progress: Callable[[], PhaseProgress]) -> None:
        """After an optimizer step of ``phase``: a point if one is due or a rung was taken."""
        due = time.monotonic() - self._saved_at >= self._resume.every_s
        if due or len(self._taken) > self._rungs_saved:
            under_way = progress()
            # The phase's own models come with its progress; those finished phases trained, here.
            earlier = trained_weights(self._pipeline, self._finished())
            weights = {**earlier, **under_way.weights}
            self._save(phase, progress=dataclasses.replace(under_way, weights=weights))

    def phase_done(self) -> None:
        """A point between phases: the finished ones' models, no progress."""
        self._save(None, weights=trained_weights(self._pipeline, self._finished()))

    def answering(self, split: str, *, last: bool) -> Callable[[Answered, bool], None]:
        """The ``after_batch`` hook of an evaluation of ``split`` ("eval" or "test"): a point
        when one is due, and when the split is answered whole unless it is the trial's ``last``
        (the trial then ends and deletes its point: a whole copy of the trained weights for
        nothing)."""

        def after_batch(answered: Answered, whole: bool) -> None:
            if whole and last:
                return
            if whole:
                self._answered[split] = answered
            if whole or time.monotonic() - self._saved_at >= self._resume.every_s:
                self._save(
                    split,
                    weights=trained_weights(self._pipeline, self._finished()),
                    answered={**self._answered, split: answered},
                )

        return after_batch

    def _finished(self) -> list[Phase]:
        return [phase for phase in self._trained if phase.name in self._final_losses]

    def _save(
        self,
        phase: str | None,
        progress: PhaseProgress | None = None,
        weights: dict[str, dict[str, torch.Tensor]] | None = None,
        answered: dict[str, Answered] | None = None,
    ) -> None:
        point = ResumePoint(
            config=self._config_json,
            data_fingerprint=self._data_fingerprint,
            finished=dict(self._final_losses),
            costs={
                cost.name: cost
                for cost in self._meter.costs()
                if cost.name not in ("load", "index")
            },
            rungs=list(self._taken),
            phase=phase,
            progress=progress,
            weights=weights or {},
            answered=answered or {},
        )
        save_point(self._resume, point)
        self._saved_at, self._rungs_saved = time.monotonic(), len(self._taken)


def cost_before(point: ResumePoint | None, phase: str) -> PhaseCost | None:
    """What ``phase`` had cost when ``point`` was saved (it goes on from there), if anything."""
    return point.costs.get(phase) if point is not None else None


def usable_point(
    resume: Resume | None,
    config: TrialConfig,
    data_fingerprint: str,
    trained: list[Phase],
    out_dir: Path | None,
) -> ResumePoint | None:
    """The resume point this trial continues from, if there is one it can continue: written by
    the same config on the same data, for phases this run trains (not ones it now loads instead),
    and, where the run saves its phases' models, with no finished phase whose model a later one
    trains again (finished too or not: its models as they finished are gone, and would be saved
    as the later phase left them)."""
    if resume is None:
        return None
    point = load_point(resume, config.model_dump_json(), data_fingerprint)
    if point is None:
        return None
    names = [phase.name for phase in trained]
    done = set(point.finished) | ({point.phase} if point.phase and point.progress else set())
    if not done <= set(names):
        return None
    if out_dir is not None:
        for earlier, later in itertools.combinations(trained, 2):
            retrained = (earlier.trains_embedder and later.trains_embedder) or (
                earlier.trains_generator and later.trains_generator
            )
            if retrained and earlier.name in point.finished:
                return None
    return point


def _models(pipeline: Pipeline) -> dict[str, torch.nn.Module]:
    return {"embedder": pipeline.embedder, "generator": pipeline.generator.model}
