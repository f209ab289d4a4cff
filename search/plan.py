"""The search plan: which runs each method needs, which runs methods share, and in what order.

A plan is computed from a :class:`search.spec.StudySpec` alone: no model, tokenizer or data set is
loaded. Each method becomes one or more *stages*, read off its declaration in
:mod:`trainers.methods`: a stage searches the learning rates its method's own phases train (one
rate alone, or both, coupled, for a joint method) and takes each phase the method loads, with that
phase's learning rates, from the best trial of the stage of the method that trains it. That is the
paper's point made executable: independent and two_phase search each rate alone (n + m trials),
ft_gen *is* two_phase's phase 1 when it trains with RAG-Token (so it runs once for both), and joint
methods either search the Cartesian grid (n x m) or reuse a pair found earlier. A loaded phase
whose method must train with other settings than the spec's gets a stage of its own,
``<method>.<phase>``.

Stages run in an order where each comes after the stages it depends on, the method's rank breaking
ties; each stage carries its forecast (:mod:`search.forecast`), and the plan's total replays how a
launch schedules trials (:attr:`Plan.start_order`, ``concurrency`` at once, a stage starting once
the stages it depends on are done), so stages that do not depend on each other overlap. With
early stopping, each stage and the total also carry the forecast with it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from search.forecast import early_stopping_seconds, launch_seconds, stage_memory, trial_seconds
from search.index_forecast import IndexForecast, forecast_index
from search.spec import StudySpec
from trainers import (
    RATES,
    ConfigError,
    LearningRate,
    TrialMemory,
    method_declaration,
    method_names,
    or_list,
    phase_rates,
)

__all__ = ["Plan", "Stage", "grid_points", "make_plan"]


@dataclass(frozen=True)
class Stage:
    """A set of trials of one method: what it searches, and what it takes from earlier stages."""

    name: str  # unique: the method's name, or "<method>.<phase>" for a method's extra stage
    method: str  # the trainers method each trial runs
    searched: tuple[str, ...]  # learning rates searched here
    n_trials: int
    fixed_from: dict[str, str]  # learning rate -> stage whose best trial supplies it
    reuse_from: dict[str, str]  # trainers phase name -> stage whose best checkpoint is loaded
    training_overrides: dict[str, object]  # TrainingConfig fields changed for this stage
    serves: tuple[str, ...]  # study methods whose result depends on this stage
    depends_on: tuple[str, ...]  # stages that must finish first
    forecast_s: float | None  # wall seconds for the whole stage; None: a model or size unknown
    trial_forecast_s: float | None  # wall seconds of one trial; None: a model or size unknown
    # The same with the spec's early stopping (a trial's mean); None: early stopping off or unknown.
    early_stopping_forecast_s: float | None
    early_stopping_trial_s: float | None
    # Forecast peak memory of one trial (host: what it asks Ray for); None: a model unknown.
    trial_memory: TrialMemory | None


@dataclass(frozen=True)
class Plan:
    """Stages in a valid run order (every stage after the stages it depends on)."""

    stages: tuple[Stage, ...]
    methods: tuple[str, ...]  # the study's methods, in the spec's order
    rate_trials: tuple[int, int]  # (n, m): trials searching lr_embedder, lr_generator alone
    # Forecast wall seconds of the whole launch, stages overlapping as a launch runs them; None
    # when a stage's forecast is unknown.
    forecast_s: float | None
    early_stopping_forecast_s: float | None = None  # the same with early stopping; None: off
    index: IndexForecast | None = None  # the retrieval index and its cost; None: not forecast

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage '{name}' in this plan; stages: {[s.name for s in self.stages]}")

    @property
    def total_trials(self) -> int:
        """Trials of the whole study, each shared stage counted once."""
        return sum(stage.n_trials for stage in self.stages)

    @property
    def start_order(self) -> tuple[str, ...]:
        """The order in which a launch gives free slots to stages that may run: first those more
        stages wait on (the critical path: ft_gen before the baselines), then run order."""
        rank = {stage.name: index for index, stage in enumerate(self.stages)}
        depends = {stage.name: stage.depends_on for stage in self.stages}
        waiting_on = {
            name: sum(name in _ancestors(other, depends)[1:] for other in depends)
            for name in depends
        }
        return tuple(sorted(depends, key=lambda name: (-waiting_on[name], rank[name])))

    def search_cost(self, method: str) -> dict[str, object]:
        """What ``method``'s result needs, shared stages included, against one Cartesian grid.

        Keys: ``stages`` (stage -> trials, for every stage the result depends on), ``shared``
        (stage -> the other study methods it also serves), ``trials`` (their sum),
        ``searched_trials`` (trials of stages that search a rate: n + m when separable),
        ``search`` ("none", "one rate", "separable" or "cartesian") and ``cartesian_trials``
        (n x m, a grid over both rates, for comparison).
        """
        if method not in self.methods:
            raise ConfigError(
                f"method '{method}' is not in this study; its methods: {', '.join(self.methods)}"
            )
        needed = _closure(self, method)
        stages = {stage.name: stage.n_trials for stage in self.stages if stage.name in needed}
        searched = [self.stage(name) for name in stages if self.stage(name).searched]
        rates = {rate for stage in searched for rate in stage.searched}
        if not rates:
            search = "none"
        elif len(rates) == 1:
            search = "one rate"
        elif any(len(stage.searched) == 2 for stage in searched):
            search = "cartesian"
        else:
            search = "separable"
        shared = {
            name: [m for m in self.stage(name).serves if m != method]
            for name in stages
            if any(m != method for m in self.stage(name).serves)
        }
        n, m = self.rate_trials
        return {
            "method": method,
            "stages": stages,
            "shared": shared,
            "trials": sum(stages.values()),
            "searched_trials": sum(stage.n_trials for stage in searched),
            "search": search,
            "cartesian_trials": n * m,
        }


def make_plan(spec: StudySpec, *, forecast: bool = True, cache_dir: Path | None = None) -> Plan:
    """The stages ``spec`` needs, shared where methods run the same trials, in run order.

    ``forecast=False`` leaves every forecast None: reading a stored study needs only the stages,
    and the forecast asks the CPU for bf16 support through torch, which queries should not load.
    ``cache_dir``: the model and index cache, where the index forecast looks for vectors already
    encoded (None: it does not look).
    """
    search = spec.search
    grid = search.sampler == "grid"
    n = len(search.lr_embedder) if grid else search.n_trials
    m = len(search.lr_generator) if grid else search.n_trials
    rate_trials: dict[LearningRate, int] = {"lr_embedder": n, "lr_generator": m}
    methods = tuple(dict.fromkeys(spec.methods))
    drafts: dict[str, Stage] = {}  # depends_on, serves and forecast_s are filled in below
    ranks: dict[str, tuple[int, int]] = {}  # stage -> its place among stages free to run
    stage_of: dict[tuple[str, str], str] = {}  # (method, its training overrides) -> stage

    def add(method: str, overrides: dict[str, object], name: str) -> str:
        """The stage running ``method`` with ``overrides`` of the spec's training, drafted (as
        ``name``) with the stages it takes phases and rates from, unless one already runs it."""
        key = (method, repr(sorted(overrides.items())))
        if key in stage_of:
            return stage_of[key]
        declaration = method_declaration(method)
        fixed: dict[str, str] = {}
        reuse_from: dict[str, str] = {}
        # Loaded phases in the order of the models they hold, embedder first, as the rates are.
        for phase in sorted(declaration.loaded, key=lambda p: "lr_embedder" not in phase_rates(p)):
            source_overrides = _differing(spec, {**overrides, **phase.overrides})
            source_name = f"{name}.{phase.name}" if source_overrides else phase.method
            source = add(phase.method, source_overrides, source_name)
            reuse_from[phase.name] = source
            fixed |= dict.fromkeys(phase_rates(phase), source)
        searched: tuple[str, ...] = declaration.rates
        n_trials = rate_trials[declaration.rates[0]] if declaration.rates else 1
        if declaration.joint and search.joint == "cartesian":
            n_trials = n * m if grid else search.n_trials
        elif declaration.joint:
            pair = drafts[add_pair(search.joint_reuse_from, overrides, name)]
            fixed = {**{rate: pair.name for rate in pair.searched}, **pair.fixed_from}
            searched, n_trials = (), 1
        drafts[name] = Stage(
            name=name,
            method=method,
            searched=searched,
            n_trials=n_trials,
            fixed_from={
                rate: fixed[rate] for rate in RATES if rate in fixed and rate not in searched
            },
            reuse_from=reuse_from,
            training_overrides=overrides,
            serves=(),
            depends_on=(),
            forecast_s=None,
            trial_forecast_s=None,
            early_stopping_forecast_s=None,
            early_stopping_trial_s=None,
            trial_memory=None,
        )
        ranks[name] = (declaration.rank, 1 if overrides else 0)  # a variant after its method
        stage_of[key] = name
        return name

    def add_pair(source: str, overrides: dict[str, object], name: str) -> str:
        """The stage whose best trial holds both rates for a joint method to reuse."""
        if not _finds_both_rates(source):
            pairs = [method for method in method_names() if _finds_both_rates(method)]
            raise ConfigError(
                f"search.joint_reuse_from is '{source}', which does not find both learning rates; "
                f"use {or_list(pairs)}, or set search.joint: cartesian"
            )
        return add(source, overrides, f"{name}.{source}" if overrides else source)

    for method in methods:
        add(method, {}, method)

    depends = {
        name: tuple(dict.fromkeys([*draft.fixed_from.values(), *draft.reuse_from.values()]))
        for name, draft in drafts.items()
    }
    serves: dict[str, list[str]] = {name: [] for name in drafts}
    for method in methods:
        for name in _ancestors(method, depends):
            serves[name].append(method)
    stages = []
    for name in _run_order(depends, ranks):
        stage = replace(drafts[name], serves=tuple(serves[name]), depends_on=depends[name])
        if not forecast:
            stages.append(stage)
            continue
        per_trial = trial_seconds(stage, spec)
        stopping = early_stopping_seconds(stage, spec)
        waves = stage.n_trials / min(spec.concurrency, stage.n_trials)
        stages.append(
            replace(
                stage,
                forecast_s=None if per_trial is None else waves * per_trial,
                trial_forecast_s=per_trial,
                early_stopping_forecast_s=None if stopping is None else waves * stopping,
                early_stopping_trial_s=stopping,
                trial_memory=stage_memory(stage, spec),
            )
        )
    plan = Plan(stages=tuple(stages), methods=methods, rate_trials=(n, m), forecast_s=None)
    if not forecast:
        return plan
    stopping_s = None
    if spec.search.early_stopping is not None:
        stopping_s = launch_seconds(plan, spec.concurrency, early_stopping=True)
    return replace(
        plan,
        forecast_s=launch_seconds(plan, spec.concurrency),
        early_stopping_forecast_s=stopping_s,
        index=forecast_index(spec, cache_dir=cache_dir),
    )


def grid_points(stage: Stage, spec: StudySpec) -> list[dict[str, float]]:
    """The trials of ``stage`` under the grid sampler: one dict of searched rates per trial.

    Two searched rates give their Cartesian product; a stage that searches nothing has one trial,
    ``[{}]`` (its rates come from ``fixed_from``). Under tpe/random the sampler picks the points,
    so a searching stage has no grid: ``ValueError``.
    """
    if not stage.searched:
        return [{}]
    if spec.search.sampler != "grid":
        raise ValueError(
            f"stage '{stage.name}' is searched by the {spec.search.sampler} sampler; it has no grid"
        )
    values = [getattr(spec.search, rate) for rate in stage.searched]
    return [dict(zip(stage.searched, point, strict=True)) for point in itertools.product(*values)]


def _differing(spec: StudySpec, overrides: dict[str, object]) -> dict[str, object]:
    """The ``overrides`` that change the spec's training (the rest run as the spec's stages)."""
    return {
        field: value for field, value in overrides.items() if getattr(spec.training, field) != value
    }


def _finds_both_rates(method: str) -> bool:
    """Whether ``method``'s best trial holds both rates, each found apart: searched by its own
    phases or taken with the phases it loads (a joint method's pair is not found one at a time)."""
    declaration = method_declaration(method)
    rates = {rate for phase in declaration.phases for rate in phase_rates(phase)}
    return not declaration.joint and rates == set(RATES)


def _ancestors(name: str, depends: dict[str, tuple[str, ...]]) -> list[str]:
    seen: list[str] = []
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.append(current)
            todo += depends[current]
    return seen


def _closure(plan: Plan, method: str) -> set[str]:
    return set(_ancestors(method, {stage.name: stage.depends_on for stage in plan.stages}))


def _run_order(depends: dict[str, tuple[str, ...]], ranks: dict[str, tuple[int, int]]) -> list[str]:
    """Kahn's topological sort, taking the lowest-ranked of the ready stages."""
    done: list[str] = []
    waiting = sorted(depends, key=ranks.__getitem__)
    while waiting:
        ready = next(name for name in waiting if set(depends[name]) <= set(done))
        done.append(ready)
        waiting.remove(ready)
    return done
