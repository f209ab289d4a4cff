"""What a study's trials will cost: wall time and peak memory, forecast from the spec alone.

Time, per trial: analytic FLOPs with the rules of :mod:`trainers.cost`, divided by an assumed
achieved throughput, plus a fixed overhead. Tokens per example are taken at the spec's caps
(:func:`trainers.memory.token_caps`): ``nll_concat`` trains on one prompt with all k passages, RAG
objectives on k single-passage prompts; MNRL encodes questions only (document vectors are frozen).
Training covers ``n_train x epochs`` examples per trained phase (loaded phases cost nothing);
evaluation generates ``max_new_tokens`` for ``n_validation`` questions. Parameter counts come from
:mod:`search.sizes`; for a model or data size not listed there the forecast is ``None``
("unknown"), never a guess. A stage alone runs ``n_trials / min(concurrency, n_trials)``
waves; a launch's total replays how it schedules trials (:func:`launch_seconds`). With early
stopping, :func:`early_stopping_seconds` forecasts a stage's mean trial from its rungs.

Memory, per trial: :func:`trainers.memory.trial_memory` for the phases a trial trains; that peak is
what a trial asks Ray for (:func:`trial_memory_ask`).
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING, NamedTuple

from search.sizes import embedder_shape, hub_questions, model_shapes, unknown_models
from search.throughput import (
    GPU_FLOPS_PER_GPU,
    cpu_flops_per_cpu,
    throughput_text,
    trains_in_bf16,
)
from trainers import (
    MiB,
    ModelShape,
    TrainingConfig,
    TrialMemory,
    forward_flops,
    method_phases,
    resume_point_bytes,
    token_caps,
    training_flops,
    trial_memory,
)

if TYPE_CHECKING:
    from search.plan import Plan, Stage
    from search.spec import StudySpec
    from trainers import Phase

__all__ = [
    "early_stopping_seconds",
    "encode_note",
    "encode_seconds",
    "forecast_gaps",
    "forecast_note",
    "gib_text",
    "launch_seconds",
    "method_memory",
    "resume_point_size",
    "stage_memory",
    "trains_in_bf16",
    "trial_memory_ask",
    "trial_seconds",
]

# Per trial, whatever it trains: loading both models and opening (or building) the cached index.
_TRIAL_OVERHEAD_S = 30.0


def trial_seconds(stage: Stage, spec: StudySpec) -> float | None:
    """Wall seconds of one trial of ``stage``; None when a model or the data size is unknown."""
    flops = _trial_flops(stage, spec)
    if flops is None:
        return None
    return _TRIAL_OVERHEAD_S + (sum(flops.phases) + flops.evaluation) / _trial_throughput(spec)


def early_stopping_seconds(stage: Stage, spec: StudySpec) -> float | None:
    """Mean wall seconds of a trial of ``stage`` under the spec's early stopping, as successive
    halving is designed to go: of n trials, ``max(1, n / reduction_factor**j)`` go on past rung
    j; one stopped at rung j pays its training up to there and j signals, no evaluation; the rest
    run to the end and pay every signal. None when early stopping is off or the forecast unknown;
    a stage of one trial, or one that trains nothing, stops no trial."""
    early_stopping, flops = spec.search.early_stopping, _trial_flops(stage, spec)
    if early_stopping is None or flops is None:
        return None
    n, throughput = stage.n_trials, _trial_throughput(spec)
    if n <= 1 or not flops.phases:
        return trial_seconds(stage, spec)
    # Training and signal FLOPs done at each rung: each fraction of each trained phase, in order.
    rungs = [
        (sum(flops.phases[:index]) + fraction * phase, flops.signals[index])
        for index, phase in enumerate(flops.phases)
        for fraction in early_stopping.rungs
    ]
    total_s, going_on, signals = 0.0, float(n), 0.0
    for number, (trained, signal) in enumerate(rungs, 1):
        signals += signal
        survivors = max(1.0, n / early_stopping.reduction_factor**number)
        stopped_s = _TRIAL_OVERHEAD_S + (trained + signals) / throughput
        total_s += (going_on - survivors) * stopped_s
        going_on = survivors
    whole = sum(flops.phases) + flops.evaluation + signals
    return (total_s + going_on * (_TRIAL_OVERHEAD_S + whole / throughput)) / n


def launch_seconds(plan: Plan, concurrency: int, *, early_stopping: bool = False) -> float | None:
    """Replay a launch with forecast trial times: ``concurrency`` slots, each freed slot given to
    the first stage in :attr:`Plan.start_order` whose dependencies are done and whose trials are
    not all started. ``early_stopping``: every trial takes its stage's mean time with it."""
    per_trial = {
        stage.name: stage.early_stopping_trial_s if early_stopping else stage.trial_forecast_s
        for stage in plan.stages
    }
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


def encode_seconds(spec: StudySpec, passages: int) -> tuple[float, float] | None:
    """Seconds to encode ``passages`` passages at ``training.embedder_max_length`` tokens (an upper
    bound), (on one GPU, on one CPU in fp32); None when the embedder is not in the size table."""
    embedder = embedder_shape(spec)
    if embedder is None:
        return None
    flops = forward_flops(embedder.params, passages * spec.training.embedder_max_length)
    return flops / GPU_FLOPS_PER_GPU, flops / cpu_flops_per_cpu(bf16=False)


def encode_note() -> str:
    """How the encode time of the index is forecast."""
    return (
        "encode: analytic FLOPs (2 x embedder parameters x passages x tokens) at "
        f"{GPU_FLOPS_PER_GPU:.0e} FLOP/s per GPU or {cpu_flops_per_cpu(bf16=False):.1e} per CPU in "
        "fp32 (the index is encoded without autocast)"
    )


def stage_memory(stage: Stage, spec: StudySpec) -> TrialMemory | None:
    """Forecast peak memory of one trial of ``stage``: the phases it trains, not those it loads."""
    stage_spec = spec.model_copy(update={"training": _stage_training(stage, spec)})
    return method_memory(stage_spec, stage.method, reused_phases=tuple(stage.reuse_from))


def method_memory(
    spec: StudySpec, method: str, *, reused_phases: tuple[str, ...] = ()
) -> TrialMemory | None:
    """Forecast peak memory of one trial of ``method`` that loads ``reused_phases`` from
    checkpoints and trains the rest (trainers.memory); None if a model is not in the size table."""
    shapes = model_shapes(spec)
    if shapes is None:
        return None
    return trial_memory(
        _trained_phases(method, spec.training, reused_phases),
        embedder=shapes.embedder,
        generator=shapes.generator,
        generator_trainable=_generator_trainable(shapes.generator, spec),
        training=spec.training,
        bf16=trains_in_bf16(spec),
        on_gpu=spec.resources.gpus > 0,
        quantized=spec.models.generator_finetune == "qlora",
    )


def resume_point_size(stage: Stage, spec: StudySpec) -> float | None:
    """Bytes of one resume point of a trial of ``stage`` (trainers.memory.resume_point_bytes for
    the phases it trains); None if a model is not in the size table."""
    shapes = model_shapes(spec)
    if shapes is None:
        return None
    phases = _trained_phases(stage.method, _stage_training(stage, spec), tuple(stage.reuse_from))
    return resume_point_bytes(
        phases,
        embedder=shapes.embedder,
        generator_trainable=_generator_trainable(shapes.generator, spec),
    )


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


def gib_text(n_bytes: float) -> str:
    """Bytes as GiB with one decimal, as every memory figure is shown."""
    return f"{n_bytes / 2**30:.1f} GiB"


def forecast_note(spec: StudySpec) -> str:
    """How the time forecast is computed, with the throughput it assumes for ``spec``."""
    return (
        "forecast: analytic FLOPs per trial (trainers.cost rules; n_train x epochs examples per "
        "trained phase at the spec's token caps, k single-passage prompts for RAG objectives, "
        f"n_validation generations) / {throughput_text(spec)}, + {_TRIAL_OVERHEAD_S:.0f} s per "
        "trial for loading; a stage alone runs trials / min(concurrency, trials) waves"
    )


def forecast_gaps(spec: StudySpec) -> list[str]:
    """Why a forecast is unknown: each model or size the tables lack."""
    gaps = unknown_models(spec)
    if _n_train(spec) is None:
        gaps.append(
            "the training set size is unknown (data.n_train is null and the data set is not "
            "one of the known hub splits); set data.n_train for a forecast"
        )
    return gaps


def _trial_throughput(spec: StudySpec) -> float:
    if spec.resources.gpus > 0:
        return GPU_FLOPS_PER_GPU * spec.resources.gpus
    return cpu_flops_per_cpu(trains_in_bf16(spec)) * spec.resources.cpus


class _TrialFlops(NamedTuple):
    phases: tuple[float, ...]  # training, per phase the trial trains, in order
    evaluation: float
    signals: tuple[float, ...]  # one rung signal, per trained phase


def _trial_flops(stage: Stage, spec: StudySpec) -> _TrialFlops | None:
    """FLOPs of the phases the stage's trials train, of evaluation and of one rung signal of each;
    None if unknown."""
    shapes = model_shapes(spec)
    if shapes is None:
        return None
    embedder, generator = shapes
    training = _stage_training(stage, spec)
    k = training.k
    question = training.max_question_tokens
    caps = token_caps(training)
    single, concat = caps.single_prompt, caps.concat_prompt
    generator_trainable = _generator_trainable(generator, spec)

    # A signal reads the evaluation prompt with the gold answer in it, where evaluation generates;
    # an embedder-only phase's encodes every validation question and reads no prompt.
    asked = forward_flops(embedder.params, question)
    early_stopping = spec.search.early_stopping
    questions = min(early_stopping.questions, spec.data.n_validation) if early_stopping else 0
    answer_signal = questions * (asked + forward_flops(generator.params, concat))
    passage_signal = spec.data.n_validation * asked

    per_example: list[float] = []  # training FLOPs per example, per trained phase
    signals: list[float] = []
    for phase in method_phases(stage.method, training):
        if phase.name in stage.reuse_from:
            continue  # loaded from an earlier stage's checkpoint, not trained
        signals.append(answer_signal if phase.trains_generator else passage_signal)
        e_trainable = embedder.params if phase.trains_embedder else 0
        g_trainable = generator_trainable if phase.trains_generator else 0
        if phase.objective == "mnrl":
            per_example.append(
                _gold_per_question(spec) * training_flops(embedder.params, e_trainable, question)
            )
            continue
        rows = concat if phase.objective == "nll_concat" else k * single
        per_example.append(
            training_flops(embedder.params, e_trainable, question)
            + training_flops(generator.params, g_trainable, rows)
        )
    n_train = _n_train(spec) if per_example else 0
    if n_train is None:
        return None
    # The test split (data.n_test) is scored by trials that lead their stage when they finish:
    # the stage's best at least, taken as one a stage. Retrieval-only evaluation generates nothing.
    generation = forward_flops(
        generator.params, concat - training.max_answer_tokens + training.max_new_tokens
    )
    evaluated = spec.data.n_validation + spec.data.n_test / max(stage.n_trials, 1)
    evaluation = evaluated * (asked + (training.evaluate == "answers") * generation)
    return _TrialFlops(
        phases=tuple(n_train * training.epochs * flops for flops in per_example),
        evaluation=evaluation,
        signals=tuple(signals),
    )


def _trained_phases(
    method: str, training: TrainingConfig, reused_phases: tuple[str, ...]
) -> tuple[Phase, ...]:
    """The phases a trial of ``method`` trains: those it does not load from checkpoints."""
    return tuple(
        phase for phase in method_phases(method, training) if phase.name not in reused_phases
    )


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
    total = hub_questions(data)
    return None if total is None else max(total - data.n_validation - data.n_test, 0)


def _gold_per_question(spec: StudySpec) -> float:
    # MNRL trains one item per gold document: HotPotQA questions are two-hop.
    if spec.data.source == "hotpotqa":
        return 2.0
    if spec.data.source == "generated":
        return 1.0 + spec.data.generated.two_hop_fraction
    return 1.0
