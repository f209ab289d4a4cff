"""``ragsweep plan``'s tables: the stages, each method's search cost, totals and the forecast."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from search.forecast import (
    forecast_gaps,
    forecast_note,
    gib_text,
    trains_in_bf16,
    trial_memory_ask,
)
from search.plan import Plan, Stage
from search.spec import EarlyStopping, StudySpec
from trainers import method_declaration

__all__ = ["render_plan"]


def render_plan(plan: Plan, spec: StudySpec) -> RenderableType:
    """Tables for ``ragsweep plan``: the stages, each method's search cost, totals, the forecast."""
    stages = Table(title=f"search plan: {spec.name}", title_justify="left")
    for column in ("stage", "method", "searches", "trials", "after / takes", "serves"):
        stages.add_column(column, justify="right" if column == "trials" else "left")
    stages.add_column("forecast", justify="right")
    early_stopping = spec.search.early_stopping is not None
    if early_stopping:
        stages.add_column("with early stopping", justify="right")
    stages.add_column("memory / trial", justify="right")
    for stage in plan.stages:
        with_stopping = [_duration(stage.early_stopping_forecast_s)] if early_stopping else []
        stages.add_row(
            stage.name,
            stage.method + _overrides_text(stage),
            _searches_text(stage, spec),
            str(stage.n_trials),
            _takes_text(stage),
            ", ".join(stage.serves),
            _duration(stage.forecast_s),
            *with_stopping,
            _memory_text(stage, spec),
        )

    costs = Table(title="search cost per method", title_justify="left")
    costs.add_column("method")
    costs.add_column("stages it needs (trials)")
    for column in ("searched trials", "separable n+m", "Cartesian n x m"):
        costs.add_column(column, justify="right")
    costs.add_column("shared stages (run once)")
    n, m = plan.rate_trials
    for method in plan.methods:
        cost = plan.search_cost(method)
        stage_trials: dict[str, int] = cost["stages"]  # type: ignore[assignment]
        shared: dict[str, list[str]] = cost["shared"]  # type: ignore[assignment]
        both = cost["search"] in ("separable", "cartesian")
        costs.add_row(
            method,
            " + ".join(f"{name} {count}" for name, count in stage_trials.items()),
            str(cost["searched_trials"]),
            f"{n + m} = {n} + {m}" if both else "-",
            str(cost["cartesian_trials"]) if both else "-",
            ", ".join(shared),
        )

    notes = [Text(note) for note in _sharing_notes(plan, spec)]
    total = plan.forecast_s
    where = _hardware_text(spec)
    stopping = f"; with early stopping {_duration(plan.early_stopping_forecast_s)}"
    notes.append(
        Text(
            f"total: {plan.total_trials} trials (shared stages counted once), forecast "
            f"{_duration(total)} with {where}, stages that do not depend on each other "
            f"overlapping{stopping if early_stopping else ''}"
        )
    )
    notes += [Text(f"forecast unknown: {gap}") for gap in forecast_gaps(spec)]
    notes.append(Text(_memory_note(spec), style="dim"))
    notes.append(Text(forecast_note(spec), style="dim"))
    if spec.search.early_stopping is not None:
        notes.append(Text(_early_stopping_note(spec.search.early_stopping), style="dim"))
    return Group(stages, costs, *notes)


def _searches_text(stage: Stage, spec: StudySpec) -> str:
    if not stage.searched:
        return "-"
    rates = " x ".join(stage.searched)
    if spec.search.sampler != "grid":
        return f"{rates} ({spec.search.sampler})"
    sizes = " x ".join(str(len(getattr(spec.search, rate))) for rate in stage.searched)
    return f"{rates} (grid {sizes})"


def _takes_text(stage: Stage) -> str:
    parts = [f"{rate} <- {source}" for rate, source in stage.fixed_from.items()]
    parts += [f"{phase} phase <- {source}" for phase, source in stage.reuse_from.items()]
    return "; ".join(parts) or "-"


def _overrides_text(stage: Stage) -> str:
    if not stage.training_overrides:
        return ""
    return " (" + ", ".join(f"{k}={v}" for k, v in stage.training_overrides.items()) + ")"


def _sharing_notes(plan: Plan, spec: StudySpec) -> list[str]:
    """What the plan shares and why: a loaded phase run by its method's own stage or by a stage of
    its own, stages that only load, joint methods that reuse a pair."""
    shared, loading, joint = [], [], []
    for stage in plan.stages:
        declaration = method_declaration(stage.method)
        training = spec.training.model_copy(update=stage.training_overrides)
        for phase in declaration.loaded:
            if not phase.training:
                continue
            number = declaration.phases.index(phase) + 1
            settings = ", ".join(f"training.{k}: {v}" for k, v in phase.training)
            source = stage.reuse_from[phase.name]
            if source == phase.method:
                shared.append(
                    f"{source} is {stage.name}'s phase {number} ({settings}): counted once"
                )
            else:
                theirs = ", ".join(str(getattr(training, k)) for k, _ in phase.training)
                ours = ", ".join(str(v) for _, v in phase.training)
                shared.append(
                    f"{stage.name}'s phase {number} is its own stage '{source}': {phase.method} "
                    f"trains with {theirs}, phase {number} with {ours} (set {settings} to share "
                    "them)"
                )
        if declaration.loaded and not declaration.trained:
            sources = [f"{source}'s" for source in dict.fromkeys(stage.reuse_from.values())]
            loads = " and ".join([", ".join(sources[:-1]), sources[-1]] if sources[1:] else sources)
            loading.append(f"{stage.name} trains nothing: it loads {loads} best models")
        if declaration.joint and not stage.searched:
            rates = stage.fixed_from
            joint.append(
                f"{stage.name} reuses {spec.search.joint_reuse_from}'s pair "
                f"(lr_embedder <- {rates['lr_embedder']}, lr_generator <- "
                f"{rates['lr_generator']}); search.joint: cartesian searches the "
                f"{math.prod(plan.rate_trials)}-point grid instead"
            )
    return shared + loading + joint


def _early_stopping_note(early_stopping: EarlyStopping) -> str:
    """The model behind the early-stopping forecast, and why a launch may stop fewer or more."""
    factor = early_stopping.reduction_factor
    rungs = ", ".join(f"{fraction:g}" for fraction in early_stopping.rungs)
    return (
        f"with early stopping: successive halving as designed, rungs at {rungs} of each trained "
        f"phase: of a stage's n trials, max(1, n / {factor}^j) go on past rung j; one stopped at "
        "rung j pays its training up to there and j signals (a forward pass over "
        f"{early_stopping.questions} validation prompts each; in a phase training the embedder "
        "alone, an encoding of the validation questions), no evaluation; the rest run to the end "
        "and pay every signal; stages of one trial or that train nothing stop none. A launch "
        "stops more or fewer: a trial trailing the best by less than "
        f"{early_stopping.noise_z:g} standard errors of their paired difference goes on, and "
        "the order trials run in decides how many reach a rung behind a better one (one first at "
        "a rung goes on, and is judged there at its next rung if a rival has reached it since; "
        "a grid runs a LoRA generator's rates from the largest down and a fully fine-tuned "
        "model's from the smallest up)"
    )


def _hardware_text(spec: StudySpec) -> str:
    if spec.resources.gpus > 0:
        per = f"{spec.resources.gpus:g} GPU"
    else:
        per = f"{spec.resources.cpus:g} CPU"
    return f"{spec.concurrency} concurrent trial(s) of {per} each"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _memory_text(stage: Stage, spec: StudySpec) -> str:
    """What a trial of ``stage`` asks of Ray, and its forecast GPU memory on GPUs."""
    ask = trial_memory_ask(stage, spec)
    text = "unknown" if ask is None else gib_text(ask)
    if spec.resources.gpus > 0 and stage.trial_memory is not None:
        text += f" + {gib_text(stage.trial_memory.device_bytes)} GPU"
    return text


def _memory_note(spec: StudySpec) -> str:
    """How the memory each trial asks for is found."""
    precision = "bf16 autocast" if trains_in_bf16(spec) else "fp32"
    if spec.resources.memory is not None:
        return (
            f"memory: every trial asks Ray for resources.memory = {gib_text(spec.resources.memory)}"
        )
    return (
        f"memory: forecast peak per trial in {precision} (weights, optimizer state, activations "
        "of a training forward with gradient checkpointing "
        + ("on" if spec.training.gradient_checkpointing else "off")
        + ", evaluation), asked of Ray so it queues trials that would not fit; "
        "resources.memory overrides it"
    )
