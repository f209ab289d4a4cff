"""The search plan: which runs each method needs, which runs methods share, and what they cost.

A plan is computed from a :class:`search.spec.StudySpec` alone: no model, tokenizer or data set is
loaded. Each method becomes one or more *stages*; a stage searches zero, one or both learning rates
and may take a rate or a trained phase from the best trial of an earlier stage. That is the paper's
point made executable (DESIGN.md, "Search cost"): independent and two_phase search each rate alone
(n + m trials), ft_gen *is* two_phase's phase 1 when it trains with RAG-Token (so it runs once for
both), and joint methods either search the Cartesian grid (n x m) or reuse a pair found earlier.

Forecast, per trial (``forecast_s``): analytic FLOPs with the rules of :mod:`trainers.cost`, divided
by an assumed achieved throughput, plus a fixed overhead. Tokens per example are taken at the
spec's caps: a question of ``max_question_tokens``, passages of ``max_doc_tokens``, an answer of
``max_answer_tokens`` and :data:`_PROMPT_OVERHEAD_TOKENS` of instruction; ``nll_concat`` trains on
one prompt with all k passages, RAG objectives on k single-passage prompts; MNRL encodes questions
only (document vectors are frozen). Training covers ``n_train x epochs`` examples per trained phase
(reused phases cost nothing); evaluation generates ``max_new_tokens`` for ``n_validation``
questions. Parameter counts come from :data:`_EMBEDDERS` / :data:`_GENERATORS`; for a model or data
size not listed the forecast is ``None`` ("unknown"), never a guess. A stage alone runs
``n_trials / min(concurrency, n_trials)`` waves; the plan's total replays how a launch schedules
trials (:attr:`Plan.start_order`, ``concurrency`` at once, a stage starting once the stages it
depends on are done), so stages that do not depend on each other overlap.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from search.spec import StudySpec
from trainers.config import TrainingConfig
from trainers.cost import forward_flops, training_flops
from trainers.environment import native_bf16
from trainers.errors import ConfigError
from trainers.memory import MiB, ModelShape, TrialMemory, token_caps, trial_memory
from trainers.methods import method_phases

__all__ = [
    "Plan",
    "Stage",
    "gib_text",
    "grid_points",
    "make_plan",
    "method_memory",
    "render_plan",
    "trains_in_bf16",
    "trial_memory_ask",
]

LearningRate = Literal["lr_embedder", "lr_generator"]
_RATES: tuple[LearningRate, ...] = ("lr_embedder", "lr_generator")
_JOINT_METHODS = ("rag_token", "rag_sequence")
# Methods whose best trial holds both learning rates, so a joint method can reuse the pair.
_PAIR_METHODS = ("two_phase", "independent")
# Run order among stages that do not depend on each other: cheap and widely shared first.
_STAGE_ORDER = (
    "none",
    "ft_embed",
    "ft_gen",
    "two_phase.generator",
    "independent",
    "two_phase",
    "rag_token",
    "rag_sequence",
)

# --- forecast constants ---------------------------------------------------------------------------
# Achieved throughput per CPU that a trial asks Ray for. Measured here (2-core CPU, one trial alone,
# one thread): demo trials of SmolLM2-135M (LoRA training, RAG-Token, greedy evaluation) ran at
# 1.0e11 to 1.3e11 FLOP per CPU-second by trainers.cost's count in bf16 autocast (AVX512-BF16),
# and at FP32_CPU_FLOPS in fp32 (CPUs without native bf16, or training.precision: fp32).
_CPU_FLOPS_PER_CPU = 1e11
_FP32_CPU_FLOPS_PER_CPU = 3.5e10
# An A10-class card (125 TFLOP/s bf16 dense peak) at ~25% utilisation, usual for LoRA/QLoRA
# fine-tuning with short sequences and 4-bit dequantisation (the paper ran on 8 x A10).
_GPU_FLOPS_PER_GPU = 3e13
# Per trial, whatever it trains: loading both models and opening (or building) the cached index.
_TRIAL_OVERHEAD_S = 30.0


# LoRA per rank = layers x sum(in + out) over q, k, v, o, gate, up, down (peft's "all-linear").
_LLAMA_8B_LORA = 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
_SMOLLM2 = ModelShape(
    134_515_008,
    lora_params_per_rank=30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * 2112),
    layers=30,
    hidden=576,
    intermediate=1536,
    kv_hidden=192,
    vocab=49_152,
)
_LLAMA_3_8B = ModelShape(
    8_030_261_248,
    lora_params_per_rank=_LLAMA_8B_LORA,
    layers=32,
    hidden=4096,
    intermediate=14336,
    kv_hidden=1024,
    vocab=128_256,
)
_MINILM = ModelShape(22_713_216)
_EMBEDDERS: dict[str, ModelShape] = {
    "minilm": _MINILM,
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM,
    "sentence-transformers/all-mpnet-base-v2": ModelShape(109_486_464),
    "tiny": ModelShape(153_536),  # trainers._tiny_models: 2-layer BERT, hidden 64
}
_GENERATORS: dict[str, ModelShape] = {
    "smollm2-135m": _SMOLLM2,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2,
    "tiny": ModelShape(  # trainers._tiny_models: 2-layer Llama, hidden 64
        106_816,
        lora_params_per_rank=2 * (2 * 128 + 2 * 96 + 3 * 192),
        layers=2,
        hidden=64,
        intermediate=128,
        kv_hidden=32,
        vocab=512,
    ),
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA_3_8B,
    # The same decoder layers as Llama-3-8B; a smaller vocabulary.
    "mistralai/Mistral-7B-Instruct-v0.2": replace(_LLAMA_3_8B, params=7_241_732_096, vocab=32_000),
}
# Questions in the hub splits trainers.data reads by default (PopQA has only "test"), for
# data.n_train: null ("all that remain after validation").
_HUB_QUESTIONS: dict[tuple[str, str], int] = {
    ("hotpotqa/hotpot_qa", "train"): 90_447,
    ("hotpotqa/hotpot_qa", "validation"): 7_405,
    ("hotpot_qa", "train"): 90_447,
    ("hotpot_qa", "validation"): 7_405,
    ("akariasai/PopQA", "test"): 14_267,
}
_DEFAULT_HUB_SPLITS = {"popqa": "test", "hotpotqa": "validation"}  # as trainers.data


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


def make_plan(spec: StudySpec) -> Plan:
    """The stages ``spec`` needs, shared where methods run the same trials, in run order."""
    search = spec.search
    grid = search.sampler == "grid"
    n = len(search.lr_embedder) if grid else search.n_trials
    m = len(search.lr_generator) if grid else search.n_trials
    methods = tuple(dict.fromkeys(spec.methods))
    drafts: dict[str, Stage] = {}  # depends_on, serves and forecast_s are filled in below

    def add(
        name: str,
        method: str,
        searched: tuple[str, ...],
        n_trials: int,
        *,
        fixed_from: dict[str, str] | None = None,
        reuse_from: dict[str, str] | None = None,
        training_overrides: dict[str, object] | None = None,
    ) -> str:
        if name not in drafts:
            drafts[name] = Stage(
                name=name,
                method=method,
                searched=searched,
                n_trials=n_trials,
                fixed_from=fixed_from or {},
                reuse_from=reuse_from or {},
                training_overrides=training_overrides or {},
                serves=(),
                depends_on=(),
                forecast_s=None,
                trial_forecast_s=None,
                trial_memory=None,
            )
        return name

    def add_method(method: str) -> str:
        if method in drafts:
            return method
        if method == "none":
            return add(method, method, (), 1)
        if method == "ft_embed":
            return add(method, method, ("lr_embedder",), n)
        if method == "ft_gen":
            return add(method, method, ("lr_generator",), m)
        if method == "independent":
            embedder, generator = add_method("ft_embed"), add_method("ft_gen")
            return add(
                method,
                method,
                (),
                1,
                fixed_from={"lr_embedder": embedder, "lr_generator": generator},
                reuse_from={"embedder": embedder, "generator": generator},
            )
        if method == "two_phase":
            # Phase 1 is ft_gen trained with RAG-Token: the very same run when ft_gen trains so.
            if spec.training.ft_gen_objective == "rag_token":
                first = add_method("ft_gen")
            else:
                first = add(
                    "two_phase.generator",
                    "ft_gen",
                    ("lr_generator",),
                    m,
                    training_overrides={"ft_gen_objective": "rag_token"},
                )
            return add(
                method,
                method,
                ("lr_embedder",),
                n,
                fixed_from={"lr_generator": first},
                reuse_from={"generator": first},
            )
        if search.joint == "cartesian":
            return add(method, method, _RATES, n * m if grid else search.n_trials)
        source = search.joint_reuse_from
        if source not in _PAIR_METHODS:
            raise ConfigError(
                f"search.joint_reuse_from is '{source}', which does not find both learning rates; "
                f"use {' or '.join(_PAIR_METHODS)} (two_phase is the paper's), or set search.joint: cartesian"
            )
        pair = drafts[add_method(source)]
        sources = {**{rate: pair.name for rate in pair.searched}, **pair.fixed_from}
        return add(method, method, (), 1, fixed_from={rate: sources[rate] for rate in _RATES})

    for method in methods:
        add_method(method)

    depends = {
        name: tuple(dict.fromkeys([*draft.fixed_from.values(), *draft.reuse_from.values()]))
        for name, draft in drafts.items()
    }
    serves: dict[str, list[str]] = {name: [] for name in drafts}
    for method in methods:
        for name in _ancestors(method, depends):
            serves[name].append(method)
    stages = []
    for name in _run_order(depends):
        stage = replace(drafts[name], serves=tuple(serves[name]), depends_on=depends[name])
        per_trial = _trial_seconds(stage, spec)
        waves = stage.n_trials / min(spec.concurrency, stage.n_trials)
        stages.append(
            replace(
                stage,
                forecast_s=None if per_trial is None else waves * per_trial,
                trial_forecast_s=per_trial,
                trial_memory=_trial_memory(stage, spec),
            )
        )
    plan = Plan(stages=tuple(stages), methods=methods, rate_trials=(n, m), forecast_s=None)
    return replace(plan, forecast_s=_launch_seconds(plan, spec.concurrency))


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


def render_plan(plan: Plan, spec: StudySpec) -> RenderableType:
    """Tables for ``ragsweep plan``: the stages, each method's search cost, totals, the forecast."""
    stages = Table(title=f"search plan: {spec.name}", title_justify="left")
    for column in ("stage", "method", "searches", "trials", "after / takes", "serves"):
        stages.add_column(column, justify="right" if column == "trials" else "left")
    stages.add_column("forecast", justify="right")
    stages.add_column("memory / trial", justify="right")
    for stage in plan.stages:
        stages.add_row(
            stage.name,
            stage.method + _overrides_text(stage),
            _searches_text(stage, spec),
            str(stage.n_trials),
            _takes_text(stage),
            ", ".join(stage.serves),
            _duration(stage.forecast_s),
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
    notes.append(
        Text(
            f"total: {plan.total_trials} trials (shared stages counted once), forecast "
            f"{_duration(total)} with {where}, stages that do not depend on each other overlapping"
        )
    )
    notes += [Text(f"forecast unknown: {gap}") for gap in _forecast_gaps(spec)]
    notes.append(Text(_memory_note(spec), style="dim"))
    notes.append(
        Text(
            "forecast: analytic FLOPs per trial (trainers.cost rules; n_train x epochs examples per "
            "trained phase at the spec's token caps, k single-passage prompts for RAG objectives, "
            f"n_validation generations) / {_throughput_text(spec)}, + {_TRIAL_OVERHEAD_S:.0f} s per "
            "trial for loading; a stage alone runs trials / min(concurrency, trials) waves",
            style="dim",
        )
    )
    return Group(stages, costs, *notes)


# --- plan helpers ---------------------------------------------------------------------------------


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


def _run_order(depends: dict[str, tuple[str, ...]]) -> list[str]:
    """Kahn's topological sort, taking the earliest of ``_STAGE_ORDER`` among ready stages."""
    done: list[str] = []
    waiting = sorted(depends, key=_STAGE_ORDER.index)
    while waiting:
        ready = next(name for name in waiting if set(depends[name]) <= set(done))
        done.append(ready)
        waiting.remove(ready)
    return done


# --- forecast -------------------------------------------------------------------------------------


def _launch_seconds(plan: Plan, concurrency: int) -> float | None:
    """Replay a launch with forecast trial times: ``concurrency`` slots, each freed slot given to
    the first stage in :attr:`Plan.start_order` whose dependencies are done and whose trials are
    not all started."""
    per_trial = {stage.name: stage.trial_forecast_s for stage in plan.stages}
    if None in per_trial.values():
        return None
    to_start = {stage.name: stage.n_trials for stage in plan.stages}
    to_finish = dict(to_start)
    running: list[tuple[float, str]] = []  # (end time, stage), a heap
    now = 0.0
    while any(to_finish.values()):
        for name in plan.start_order:
            ready = not any(to_finish[source] for source in plan.stage(name).depends_on)
            while ready and to_start[name] and len(running) < concurrency:
                heapq.heappush(running, (now + (per_trial[name] or 0.0), name))
                to_start[name] -= 1
        now, name = heapq.heappop(running)
        to_finish[name] -= 1
    return now


def _trial_seconds(stage: Stage, spec: StudySpec) -> float | None:
    flops = _trial_flops(stage, spec)
    return None if flops is None else _TRIAL_OVERHEAD_S + flops / _trial_throughput(spec)


def _trial_throughput(spec: StudySpec) -> float:
    if spec.resources.gpus > 0:
        return _GPU_FLOPS_PER_GPU * spec.resources.gpus
    per_cpu = _CPU_FLOPS_PER_CPU if trains_in_bf16(spec) else _FP32_CPU_FLOPS_PER_CPU
    return per_cpu * spec.resources.cpus


def _trial_flops(stage: Stage, spec: StudySpec) -> float | None:
    """Training FLOPs of the phases the stage's trials run, plus evaluation; None if unknown."""
    embedder = _EMBEDDERS.get(spec.models.embedder)
    generator = _GENERATORS.get(spec.models.generator)
    if embedder is None or generator is None:
        return None
    training = _stage_training(stage, spec)
    k = training.k
    question = training.max_question_tokens
    caps = token_caps(training)
    single, concat = caps.single_prompt, caps.concat_prompt
    generator_trainable = _generator_trainable(generator, spec)

    per_example = 0.0
    for phase in method_phases(stage.method, training):
        if phase.name in stage.reuse_from:
            continue  # loaded from an earlier stage's checkpoint, not trained
        e_trainable = embedder.params if phase.trains_embedder else 0
        g_trainable = generator_trainable if phase.trains_generator else 0
        if phase.objective == "mnrl":
            per_example += _gold_per_question(spec) * training_flops(
                embedder.params, e_trainable, question
            )
            continue
        per_example += training_flops(embedder.params, e_trainable, question)
        rows = concat if phase.objective == "nll_concat" else k * single
        per_example += training_flops(generator.params, g_trainable, rows)
    n_train = _n_train(spec) if per_example else 0
    if n_train is None:
        return None
    evaluation = spec.data.n_validation * (
        forward_flops(embedder.params, question)
        + forward_flops(
            generator.params, concat - training.max_answer_tokens + training.max_new_tokens
        )
    )
    return n_train * training.epochs * per_example + evaluation


def _trial_memory(stage: Stage, spec: StudySpec) -> TrialMemory | None:
    stage_spec = spec.model_copy(update={"training": _stage_training(stage, spec)})
    return method_memory(stage_spec, stage.method, reused_phases=tuple(stage.reuse_from))


def method_memory(
    spec: StudySpec, method: str, *, reused_phases: tuple[str, ...] = ()
) -> TrialMemory | None:
    """Forecast peak memory of one trial of ``method`` that loads ``reused_phases`` from
    checkpoints and trains the rest (trainers.memory); None if a model is not in the size table."""
    embedder = _EMBEDDERS.get(spec.models.embedder)
    generator = _GENERATORS.get(spec.models.generator)
    if embedder is None or generator is None:
        return None
    trained = tuple(
        phase for phase in method_phases(method, spec.training) if phase.name not in reused_phases
    )
    return trial_memory(
        trained,
        embedder=embedder,
        generator=generator,
        generator_trainable=_generator_trainable(generator, spec),
        training=spec.training,
        bf16=trains_in_bf16(spec),
        on_gpu=spec.resources.gpus > 0,
        quantized=spec.models.generator_finetune == "qlora",
    )


def trains_in_bf16(spec: StudySpec) -> bool:
    """Whether the spec's trials train in bf16 autocast: ``precision: bf16``, or ``auto`` on GPUs
    and on CPUs with native bf16 (this machine's CPU stands for the cluster's)."""
    precision = spec.training.precision
    if precision != "auto":
        return precision == "bf16"
    return spec.resources.gpus > 0 or native_bf16(torch.device("cpu"))


def _stage_training(stage: Stage, spec: StudySpec) -> TrainingConfig:
    return spec.training.model_copy(update=stage.training_overrides)


def _generator_trainable(generator: ModelShape, spec: StudySpec) -> int:
    if spec.models.generator_finetune == "full":
        return generator.params
    return generator.lora_params_per_rank * spec.models.lora_rank


def _n_train(spec: StudySpec) -> int | None:
    data = spec.data
    if data.n_train is not None:
        return data.n_train
    if data.path is not None or data.hub_name is None:
        return None
    split = data.hub_split or _DEFAULT_HUB_SPLITS.get(data.source, "")
    total = _HUB_QUESTIONS.get((data.hub_name, split))
    return None if total is None else max(total - data.n_validation, 0)


def _gold_per_question(spec: StudySpec) -> float:
    # MNRL trains one item per gold document: HotPotQA questions are two-hop.
    if spec.data.source == "hotpotqa":
        return 2.0
    if spec.data.source == "generated":
        return 1.0 + spec.data.generated.two_hop_fraction
    return 1.0


def _forecast_gaps(spec: StudySpec) -> list[str]:
    gaps = []
    if spec.models.embedder not in _EMBEDDERS:
        gaps.append(
            f"embedder '{spec.models.embedder}' is unknown to the size table "
            f"(known: {', '.join(_EMBEDDERS)})"
        )
    if spec.models.generator not in _GENERATORS:
        gaps.append(
            f"generator '{spec.models.generator}' is unknown to the size table "
            f"(known: {', '.join(_GENERATORS)})"
        )
    if _n_train(spec) is None:
        gaps.append(
            "the training set size is unknown (data.n_train is null and the data set is not "
            "one of the known hub splits); set data.n_train for a forecast"
        )
    return gaps


# --- rendering helpers ----------------------------------------------------------------------------


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
    notes = []
    names = {stage.name for stage in plan.stages}
    if "two_phase" in names:
        first = plan.stage("two_phase").reuse_from["generator"]
        if first == "ft_gen":
            notes.append(
                "ft_gen is two_phase's phase 1 (training.ft_gen_objective: rag_token): counted once"
            )
        else:
            notes.append(
                f"two_phase's phase 1 is its own stage '{first}': ft_gen trains with "
                f"{spec.training.ft_gen_objective}, phase 1 with rag_token (set "
                "training.ft_gen_objective: rag_token to share them)"
            )
    if "independent" in names:
        notes.append("independent trains nothing: it loads ft_embed's and ft_gen's best models")
    for method in _JOINT_METHODS:
        if method in names and not plan.stage(method).searched:
            sources = plan.stage(method).fixed_from
            notes.append(
                f"{method} reuses {spec.search.joint_reuse_from}'s pair "
                f"(lr_embedder <- {sources['lr_embedder']}, lr_generator <- "
                f"{sources['lr_generator']}); search.joint: cartesian searches the "
                f"{math.prod(plan.rate_trials)}-point grid instead"
            )
    return notes


def _hardware_text(spec: StudySpec) -> str:
    if spec.resources.gpus > 0:
        per = f"{spec.resources.gpus:g} GPU"
    else:
        per = f"{spec.resources.cpus:g} CPU"
    return f"{spec.concurrency} concurrent trial(s) of {per} each"


def _throughput_text(spec: StudySpec) -> str:
    if spec.resources.gpus > 0:
        return f"{_GPU_FLOPS_PER_GPU:.0e} FLOP/s per GPU (A10-class at ~25% of bf16 peak)"
    if trains_in_bf16(spec):
        return f"{_CPU_FLOPS_PER_CPU:.0e} FLOP/s per CPU (SmolLM2 LoRA in bf16 autocast, measured on a 2-core CPU)"
    return f"{_FP32_CPU_FLOPS_PER_CPU:.1e} FLOP/s per CPU (SmolLM2 LoRA in fp32: no native bf16 here, or precision fp32; measured on a 2-core CPU)"


def trial_memory_ask(stage: Stage, spec: StudySpec) -> int | None:
    """Bytes of memory a trial of ``stage`` asks Ray for: ``resources.memory``, else the stage's
    forecast peak (rounded up to 64 MiB, so stages of one size share warm workers); None when
    neither is known."""
    if spec.resources.memory is not None:
        return int(spec.resources.memory)
    if stage.trial_memory is None:
        return None
    step = 64 * MiB
    return math.ceil(stage.trial_memory.host_bytes / step) * step


def _memory_text(stage: Stage, spec: StudySpec) -> str:
    ask = trial_memory_ask(stage, spec)
    text = "unknown" if ask is None else gib_text(ask)
    if spec.resources.gpus > 0 and stage.trial_memory is not None:
        text += f" + {gib_text(stage.trial_memory.device_bytes)} GPU"
    return text


def _memory_note(spec: StudySpec) -> str:
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


def gib_text(n_bytes: float) -> str:
    """Bytes as GiB with one decimal, as every memory figure is shown."""
    return f"{n_bytes / 2**30:.1f} GiB"


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
