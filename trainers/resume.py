"""Resume points: a trial's training progress, saved as it goes, so that the same trial run again
after its process died (a launch stopped, a machine lost) continues from the last point instead of
training from the start.

A point holds what the trial has done: the trained phases it finished, and of the phase under way
its optimizer steps, the weights of the models its phases train, the optimizer and schedule, the
random number generators and its losses; or, evaluating, the questions answered so far; with the
rungs taken and what each phase has cost so far. It is one file,
replaced atomically, read with ``weights_only=True``, and taken only by a trial whose config is the
one that wrote it. On CPU the continued trial ends with the weights and metrics of one never
stopped (tests/trainers/test_resume.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from trainers.cost import PhaseCost
from trainers.evaluate import Answered
from trainers.methods import Phase
from trainers.rungs import Rung

if TYPE_CHECKING:
    from trainers.pipeline import Pipeline

__all__ = [
    "PhaseProgress",
    "Resume",
    "ResumePoint",
    "capture_random_state",
    "discard_point",
    "load_point",
    "restore_random_state",
    "restore_weights",
    "save_point",
    "trained_weights",
]

_FILE = "resume.pt"
_FORMAT = 2


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

    config: str  # the TrialConfig's JSON: a point continues only the trial that wrote it
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
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_random_state(state: dict[str, Any]) -> None:
    """Set every generator back to ``state`` (from :func:`capture_random_state`)."""
    python_version, python_state, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_state), python_gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


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
    try:
        torch.save(saved, partial)
        os.replace(partial, resume.folder / _FILE)
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk: free what the half-written point held
        raise


def load_point(resume: Resume, config_json: str) -> ResumePoint | None:
    """The point in the resume folder if the trial with ``config_json`` wrote it, else None."""
    path = resume.folder / _FILE
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != _FORMAT:
        return None
    plain = json.loads(saved["point"])
    if plain["config"] != config_json:
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
        finished=plain["finished"],
        costs={name: PhaseCost(**cost) for name, cost in plain["costs"].items()},
        rungs=[Rung(**rung) for rung in plain["rungs"]],
        phase=plain["phase"],
        progress=progress,
        weights=saved["weights"],
        answered={split: Answered(**answered) for split, answered in plain["answered"].items()},
    )


def discard_point(resume: Resume) -> None:
    """Remove the resume folder (the trial finished, or was stopped for good)."""
    (resume.folder / _FILE).unlink(missing_ok=True)
    try:
        resume.folder.rmdir()
    except OSError:
        pass  # not empty (a write under way elsewhere) or already gone


def _models(pipeline: Pipeline) -> dict[str, torch.nn.Module]:
    return {"embedder": pipeline.embedder, "generator": pipeline.generator.model}
