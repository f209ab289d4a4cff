"""One trial, end to end: load data and models, build the frozen index, run the method's phases,
evaluate on validation, and return metrics with everything needed to reproduce them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from trainers.checks import require_context_labels, resolve_device
from trainers.config import TrialConfig
from trainers.cost import CostMeter, PhaseCost, forward_flops
from trainers.data import QARecord, RagData, load_data
from trainers.environment import environment_record, native_bf16
from trainers.errors import ConfigError
from trainers.evaluate import (
    Evaluation,
    answer_logprobs,
    evaluate_pipeline,
    gold_reciprocal_ranks,
)
from trainers.index import build_index
from trainers.memory import bound_allocator
from trainers.methods import Phase, method_phases
from trainers.models import (
    load_embedder,
    load_embedder_checkpoint,
    load_generator,
    load_generator_checkpoint,
    parameter_counts,
    save_embedder,
    save_generator,
)
from trainers.pipeline import Pipeline
from trainers.prompts import PromptBuilder, prompt_fill
from trainers.results import QuestionResult, questions_json
from trainers.resume import (
    PhaseProgress,
    PointWriter,
    Resume,
    ResumePoint,
    cost_before,
    discard_point,
    restore_weights,
    usable_point,
)
from trainers.rungs import Rung, Rungs, Signal, rung_taker
from trainers.train import train_phase

__all__ = [
    "TrialResult",
    "build_pipeline",
    "run_trial",
]


@dataclass(frozen=True)
class TrialResult:
    """Flat numeric metrics (quality and cost), the record to store beside them, predictions and
    each validation question's result."""

    metrics: dict[str, float]
    record: dict[str, object]
    predictions: list[str]
    questions: list[QuestionResult]


def run_trial(
    config: TrialConfig,
    *,
    cache_dir: Path,
    out_dir: Path | None = None,
    merge_generator: bool = False,
    rungs: Rungs | None = None,
    train_missing_reuse: bool = False,
    score_test: Callable[[dict[str, float]], bool] | None = None,
    resume: Resume | None = None,
) -> TrialResult:
    """Run ``config.method`` with its learning rates and return validation metrics and cost.

    ``cache_dir`` holds converted models and cached document vectors; with ``out_dir`` every
    trained phase saves its models under ``out_dir/<phase>`` and the record goes to
    ``out_dir/trial.json``; ``merge_generator`` also saves each trained generator with its adapter
    merged in (``<phase>/generator/merged``). With ``rungs``, each trained phase reports a
    validation signal part-way (:mod:`trainers.rungs`); their report may stop the trial. With
    ``train_missing_reuse``, a phase in ``config.reuse`` whose checkpoint folder lacks its models
    (a launch resumed on a machine without the earlier runs' disk) is trained here instead: from
    the same phase seed, as the lost checkpoint was (on CPU, the same weights). With a test split
    (``data.n_test``), ``score_test`` gets the validation scores and says whether to score it too
    (a search asks whether the trial leads its stage); without it, the test split is always scored.
    With ``resume``, the trial saves resume points as it trains (:mod:`trainers.resume`) and, run
    again with the same config, continues from the last one; a finished trial removes it.
    """
    phases = method_phases(config.method, config.training)
    loaded = {
        phase.name
        for phase in phases
        if phase.name in config.reuse
        and not (train_missing_reuse and _missing_models(phase, Path(config.reuse[phase.name])))
    }
    _check_learning_rates(config, phases, loaded)
    bound_allocator()
    _seed_everything(config.seed)
    meter = CostMeter(resolve_device(config.training.device))
    data, pipeline = build_pipeline(config, cache_dir=cache_dir, meter=meter)
    index = pipeline.index
    trained = [phase for phase in phases if phase.name not in loaded]
    trained_phases = {phase.name for phase in trained}
    taken: list[Rung] = []
    final_losses: dict[str, float | None] = {}
    point = usable_point(resume, config, data.fingerprint, trained, out_dir)
    if point is not None:
        meter.phases.extend(point.costs[name] for name in point.finished)
        final_losses.update(point.finished)
        taken.extend(point.rungs)
        if rungs is not None:
            for rung in point.rungs:  # the search hears them again, as this run's: it may stop it
                rungs.report(rung)
    writer = (
        PointWriter(resume, config, data.fingerprint, pipeline, trained, meter, taken, final_losses)
        if resume is not None
        else None
    )
    # A point outside a trained phase puts its weights back before the next phase or evaluation.
    restored = point is None or point.progress is not None

    for phase in phases:
        if phase.name in loaded:
            _load_phase(phase, pipeline, Path(config.reuse[phase.name]), config, cache_dir)
            continue
        if phase.name in final_losses:
            continue  # finished before the trial was resumed: its weights come with the point
        if point is not None and not restored:
            restore_weights(pipeline, point.weights)  # as the finished phases left them
            restored = True
        continued = point if point is not None and point.phase == phase.name else None
        # Each phase draws from its own seed, so a phase trains the same whichever method runs it:
        # independent's phases equal ft_gen's and ft_embed's, two_phase's first equals ft_gen's.
        _seed_everything(_phase_seed(config.seed, phase.name))
        with meter.phase(phase.name, before=cost_before(continued, phase.name)) as cost:
            take_rung = rung_taker(
                rungs,
                phase.name,
                signal=_rung_signal(phase, pipeline, data, rungs, cost),
                cost_so_far=partial(meter.metrics, trained_phases),
                taken=taken,
            )
            losses = train_phase(
                phase,
                pipeline,
                data.train,
                lr_embedder=config.lr_embedder,
                lr_generator=config.lr_generator,
                seed=config.seed,
                cost=cost,
                after_step=partial(_after_step, take_rung, writer, phase.name),
                start=continued.progress if continued else None,
            )
        final_losses[phase.name] = losses[-1] if losses else None
        if out_dir is not None:
            _save_phase(phase, pipeline, out_dir / phase.name, merge_generator)
        if writer is not None:
            writer.phase_done()
    if point is not None:
        if not restored:
            restore_weights(pipeline, point.weights)  # every trained phase had finished
        for phase in trained:
            if out_dir is not None and phase.name in point.finished:
                # Their models are as they finished: no phase trained since changes them.
                _save_phase(phase, pipeline, out_dir / phase.name, merge_generator)

    evaluation = _evaluate_split(
        "eval", data.validation, pipeline, meter, point, writer, last=not data.test
    )
    quality = _quality(evaluation)
    test_scored = bool(data.test) and (score_test is None or score_test(quality))
    if test_scored:
        # Scored as validation is, but no search reads it: the chosen run's figure that its
        # selection did not pick.
        test = _evaluate_split("test", data.test, pipeline, meter, point, writer, last=True)
        quality |= _quality(test, prefix="test_")

    metrics: dict[str, float] = {
        **quality,
        "k": float(config.training.k),
        "bf16": float(pipeline.autocast_dtype == torch.bfloat16),
        "index_build_s": index.build_seconds,
        "index_cache_hit": float(index.cache_hit),
        **meter.metrics(trained_phases),
    }
    record: dict[str, object] = {
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "data_fingerprint": data.fingerprint,
        # The FAISS index searched, as resolved for this corpus (the kind auto chose, the
        # parameters filled in); the config holds what the spec asked for.
        "index": index.index_config.model_dump(mode="json", exclude_unset=True),
        "split": data.split_record(),
        "has_context_labels": data.has_context_labels,
        # The training questions with a gold document: what an MNRL phase trains the embedder on
        # (the others train the generator only).
        "labelled_train_questions": len(data.labelled_train),
        "phases": [phase.name for phase in phases],
        "reused_phases": sorted(loaded),
        # Phases the config reused whose checkpoints were gone, trained here instead.
        "retrained_phases": sorted(set(config.reuse) - loaded),
        # With a test split: whether this trial scored it (a search skips it where the trial
        # trailed its stage's best when it finished).
        **({"test_scored": test_scored} if data.test else {}),
        # How full this data's prompts fill the token caps, as the memory model took it.
        "prompt_fill": pipeline.training.prompt_fill,
        "final_losses": final_losses,
        # Ties the per-question results stored beside the record to it (and a rerun's to them).
        "questions_sha256": hashlib.sha256(
            questions_json(evaluation.questions).encode()
        ).hexdigest(),
        "environment": environment_record(),
    }
    if rungs is not None:
        record["rungs"] = [rung.summary() for rung in taken]
    if point is not None:
        # Where this run took up the trial an earlier process had left.
        record["resumed"] = {
            "finished_phases": sorted(point.finished),
            "phase": point.phase,
            "step": point.progress.step if point.progress else None,
            "questions_answered": len(point.answered[point.phase].predictions)
            if point.phase in point.answered
            else None,
        }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "trial.json").write_text(
            json.dumps({"metrics": metrics, "record": record}, indent=2)
        )
    if resume is not None:
        discard_point(resume)
    return TrialResult(
        metrics=metrics,
        record=record,
        predictions=evaluation.predictions,
        questions=evaluation.questions,
    )


def _after_step(
    take_rung: Callable[[int, int], None] | None,
    writer: PointWriter | None,
    phase: str,
    step: int,
    steps: int,
    progress: Callable[[], PhaseProgress],
) -> None:
    """After each optimizer step: the rung signal where one is due, then a resume point."""
    if take_rung is not None:
        take_rung(step, steps)
    if writer is not None:
        writer.after_step(phase, progress)


def build_pipeline(
    config: TrialConfig, *, cache_dir: Path, meter: CostMeter
) -> tuple[RagData, Pipeline]:
    """Load the data and both baseline models and build the frozen index (metered as two phases)."""
    device = meter.device
    with meter.phase("load"):
        data = load_data(config.data)
        _check_data(config, method_phases(config.method, config.training), data)
        embedder = load_embedder(config.models.embedder, cache_dir=cache_dir, device=device)
        generator = load_generator(
            config.models.generator,
            cache_dir=cache_dir,
            device=device,
            finetune=config.models.generator_finetune,
            lora_rank=config.models.lora_rank,
            lora_alpha=config.models.lora_alpha,
            lora_dropout=config.models.lora_dropout,
        )
    with meter.phase("index") as cost:
        # Built from the baseline E before any phase runs: document vectors never change.
        index = build_index(
            embedder,
            data.corpus,
            cache_dir=cache_dir,
            max_length=config.training.embedder_max_length,
            index=config.training.index,
            use_cache=config.training.index_cache,
        )
        cost.tokens = index.encoded_tokens
        cost.flops = forward_flops(parameter_counts(embedder)[0], index.encoded_tokens)
    training = config.training
    prompts = PromptBuilder.for_training(generator.tokenizer, training)
    if training.prompt_fill is None:
        # RAG steps forward as many questions as fit at the prompts' real fill; a launch measures
        # the same questions the same way for the memory it asks Ray for.
        fill = prompt_fill(data.train, data.corpus, prompts, training)
        training = training.model_copy(update={"prompt_fill": fill})
    pipeline = Pipeline(
        embedder=embedder,
        generator=generator,
        index=index,
        prompts=prompts,
        training=training,
        device=device,
        autocast_dtype=_autocast_dtype(config.training.precision, device),
    )
    return data, pipeline


def _check_learning_rates(config: TrialConfig, phases: tuple[Phase, ...], loaded: set[str]) -> None:
    unknown = set(config.reuse) - {phase.name for phase in phases}
    if unknown:
        names = ", ".join(phase.name for phase in phases) or "none"
        raise ConfigError(
            f"reuse names phase(s) {sorted(unknown)} that method '{config.method}' does not have; its phases: {names}"
        )
    trained = [phase for phase in phases if phase.name not in loaded]
    if any(phase.trains_embedder for phase in trained) and config.lr_embedder is None:
        raise ConfigError(
            f"method '{config.method}' trains the embedder: set lr_embedder (--lr-embedder)"
        )
    if any(phase.trains_generator for phase in trained) and config.lr_generator is None:
        raise ConfigError(
            f"method '{config.method}' trains the generator: set lr_generator (--lr-generator)"
        )


def _check_data(config: TrialConfig, phases: tuple[Phase, ...], data: RagData) -> None:
    needs_labels = any(
        phase.objective == "mnrl" and phase.name not in config.reuse for phase in phases
    )
    if needs_labels:
        require_context_labels(config.method, data)
    if config.training.evaluate == "retrieval" and not any(
        record.gold_doc_ids for record in data.validation
    ):
        raise ConfigError(
            "training.evaluate is retrieval, which scores Recall@k only, but no validation "
            "question has a gold document; label them (gold_doc_ids) or evaluate answers"
        )
    if config.training.k > len(data.corpus):
        raise ConfigError(
            f"training.k is {config.training.k} but the corpus has only {len(data.corpus)} documents; lower k"
        )


def _evaluate_split(
    split: str,
    records: Sequence[QARecord],
    pipeline: Pipeline,
    meter: CostMeter,
    point: ResumePoint | None,
    writer: PointWriter | None,
    *,
    last: bool,
) -> Evaluation:
    """Answer ``records`` as the metered phase ``split`` ("eval" or "test"): from the questions a
    resume point answered, if any, saving points as batches are answered, if a writer is given
    (``last``: nothing is evaluated after it)."""
    with meter.phase(split, before=cost_before(point, split)) as cost:
        return evaluate_pipeline(
            pipeline,
            records,
            cost,
            start=point.answered.get(split) if point else None,
            after_batch=writer.answering(split, last=last) if writer else None,
        )


def _quality(evaluation: Evaluation, prefix: str = "") -> dict[str, float]:
    """EM and F1 (where answers were generated) and Recall@k (with context labels), named with
    ``prefix``."""
    scores = {"em": evaluation.em, "f1": evaluation.f1, "recall_at_k": evaluation.recall_at_k}
    return {f"{prefix}{name}": score for name, score in scores.items() if score is not None}


def _rung_signal(
    phase: Phase, pipeline: Pipeline, data: RagData, rungs: Rungs | None, cost: PhaseCost
) -> Signal | None:
    """What ``phase`` reports at its rungs. A phase that trains the embedder alone changes answers
    only through what is retrieved, so with context labels its signal is the gold passages'
    reciprocal rank on every labelled validation question (no generator pass: a fraction of a
    second); any other phase's is the gold answer's log-probability on the first
    ``rungs.questions`` validation questions (a forward pass of the generator each)."""
    if rungs is None:
        return None
    labelled = tuple(record for record in data.validation if record.gold_doc_ids)
    if not phase.trains_generator and labelled:
        return Signal(
            "gold_doc_rr",
            tuple(record.id for record in labelled),
            partial(gold_reciprocal_ranks, pipeline, labelled, cost),
            resolution=_RANK_RESOLUTION,
        )
    questions = data.validation[: rungs.questions]
    return Signal(
        "answer_logprob",
        tuple(record.id for record in questions),
        partial(answer_logprobs, pipeline, questions, cost),
        resolution=_ANSWER_RESOLUTION,
    )


# The smallest gaps between two trials' rung signals that matter. A precise signal tells apart
# rates that will score alike: on PopQA, embedder rates 1e-5 and 1e-6 ranked the gold passages
# 0.002 apart in reciprocal rank at 2.4 standard errors (1e-5 ahead on 17 of 96 questions), and
# ended 0.6 F1 points apart the other way. Between generator rates that ended 17 F1 points apart
# the answer signal differed by 0.75 nats at half the phase.
_RANK_RESOLUTION = 0.01  # one point of mean reciprocal rank
_ANSWER_RESOLUTION = 0.05  # nats per answer token


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _phase_seed(seed: int, phase_name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{phase_name}".encode()).digest()[:4], "little")


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device has native bf16, unless ``precision`` says fp32."""
    if precision == "fp32":
        return None
    supported = native_bf16(device)
    if precision == "bf16" and not supported:
        raise ConfigError(
            f"training.precision is bf16 but device {device} has no native bf16; use 'auto' or 'fp32'"
        )
    return torch.bfloat16 if supported else None


def _save_phase(phase: Phase, pipeline: Pipeline, folder: Path, merge_generator: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "phase.json").write_text(json.dumps(dataclasses.asdict(phase)))
    if phase.trains_embedder:
        save_embedder(pipeline.embedder, folder / "embedder")
    if phase.trains_generator:
        save_generator(pipeline.generator, folder / "generator", merged=merge_generator)


def _load_phase(
    phase: Phase, pipeline: Pipeline, folder: Path, config: TrialConfig, cache_dir: Path
) -> None:
    """Take a phase's output from an earlier run's checkpoint instead of training it again."""
    missing = _missing_models(phase, folder)
    if missing:
        raise ConfigError(
            f"reuse.{phase.name}: {folder} has no {' or '.join(missing)} folder; point it at the phase folder of an earlier run"
        )
    saved = (
        json.loads((folder / "phase.json").read_text()) if (folder / "phase.json").exists() else {}
    )
    if saved.get("objective") != phase.objective:
        raise ConfigError(
            f"reuse.{phase.name}: {folder} was trained with objective {saved.get('objective')!r}, "
            f"but method '{config.method}' needs {phase.objective!r} there; reuse a run trained with it"
        )
    if phase.trains_embedder:
        pipeline.embedder = load_embedder_checkpoint(folder / "embedder", device=pipeline.device)
    if phase.trains_generator:
        pipeline.generator = load_generator_checkpoint(
            folder / "generator",
            base_name=config.models.generator,
            cache_dir=cache_dir,
            device=pipeline.device,
            finetune=config.models.generator_finetune,
            lora_rank=config.models.lora_rank,
            lora_alpha=config.models.lora_alpha,
            lora_dropout=config.models.lora_dropout,
        )


def _missing_models(phase: Phase, folder: Path) -> list[str]:
    """The models ``phase`` trains (embedder, generator) that ``folder`` has no folder for."""
    wanted = [
        name
        for name, trained in (
            ("embedder", phase.trains_embedder),
            ("generator", phase.trains_generator),
        )
        if trained
    ]
    return [name for name in wanted if not (folder / name).is_dir()]
