"""``ragsweep plan``'s tables: the stages, each method's search cost, totals and the forecast."""

from __future__ import annotations

import math

import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from search.forecast import (
    encode_note,
    forecast_gaps,
    forecast_note,
    gib_text,
    resume_point_size,
    trains_in_bf16,
    trial_memory_ask,
)
from search.index_forecast import IndexForecast
from search.plan import Plan, Stage
from search.spec import EarlyStopping, StudySpec
from trainers import CAP_FILL, EXACT_SEARCH_MAX_PASSAGES, method_declaration

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
    notes.append(Text(_resume_note(plan, spec), style="dim"))
    notes.append(Text(forecast_note(spec), style="dim"))
    if spec.search.early_stopping is not None:
        notes.append(Text(_early_stopping_note(spec.search.early_stopping), style="dim"))
    index: list[RenderableType] = []
    if plan.index is not None:
        index = [_index_table(plan.index, spec), _index_note()]
    return Group(stages, costs, *notes, *index)


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
        "resources.memory overrides it; " + _fill_text(spec)
    )


def _resume_note(plan: Plan, spec: StudySpec) -> str:
    """The disk a launch's resume points take: the largest, and as many as trials run at once."""
    if spec.resume_every_minutes is None:
        return (
            "resume points: off (resume_every_minutes: null); a trial stopped part-way is trained "
            "again from its start by a relaunch"
        )
    sizes = [resume_point_size(stage, spec) for stage in plan.stages]
    known = [size for size in sizes if size is not None]
    if len(known) < len(sizes):
        return "resume points: size unknown (a model not in the size table)"
    largest = max(known, default=0.0)
    return (
        f"resume points (disk under --runs-dir, each deleted when its trial ends): up to "
        f"{_bytes_text(int(largest))} per trial, {_bytes_text(int(largest * spec.concurrency))} "
        f"for {spec.concurrency} trial(s) at once, rewritten every "
        f"{spec.resume_every_minutes:g} min of training and at each rung and phase end "
        "(resume_every_minutes; null turns them off)"
    )


def _fill_text(spec: StudySpec) -> str:
    """The prompt fill the memory and time forecasts assume, and where it comes from."""
    fill = spec.training.prompt_fill
    if fill is not None:
        return f"prompts fill {fill:.0%} of the token caps (training.prompt_fill)"
    return (
        f"prompts assumed to fill {CAP_FILL:.0%} of the token caps (the demo's fill 49%, passages "
        "cut at max_doc_tokens up to ~85%: more memory); a launch measures its data's, "
        "training.prompt_fill sets it here"
    )


def _index_table(index: IndexForecast, spec: StudySpec) -> Table:
    """The retrieval index: its size, kind, encode time, disk and memory, each with its model."""
    table = Table(title=f"retrieval index: {index.corpus}", title_justify="left")
    for column in ("index", "forecast", "how"):
        table.add_column(column)
    if index.passages is None:
        size = "unknown"
    else:
        size = f"{index.passages:,} x {index.dimension or '?'}"
    table.add_row("passages x dims", size, index.counted_from + _dimension_gap(index, spec))
    table.add_row("kind", _kind_text(index), _kind_rule(spec))
    table.add_row("encode", _encode_text(index), _encode_how(index, spec))
    if index.index is None or index.vectors_bytes is None:
        table.add_row("disk", "unknown", "needs the corpus size and the embedder's dimension")
        table.add_row("memory / node", "unknown", "")
        table.add_row("memory / trial", "unknown", "")
        return table
    file = index.index_file_bytes or 0
    table.add_row(
        "disk",
        _bytes_text(index.disk_bytes or 0),
        f"vectors {_bytes_text(index.vectors_bytes)} (N x D x "
        f"{np.dtype(index.index.vector_dtype).itemsize} bytes, training.index.vector_dtype)"
        + (f" + {index.index.kind} index file {_bytes_text(file)}" if file else ""),
    )
    table.add_row("memory / node", _bytes_text(index.node_bytes or 0), _node_how(index, spec))
    trial = _bytes_text(index.trial_bytes or 0)
    if index.trial_device_bytes:
        trial += f" + {_bytes_text(index.trial_device_bytes)} GPU"
    table.add_row("memory / trial", trial, _trial_how(index, spec))
    return table


def _dimension_gap(index: IndexForecast, spec: StudySpec) -> str:
    if index.dimension is not None:
        return ""
    return f"; embedder '{spec.models.embedder}' has no known dimension"


def _kind_text(index: IndexForecast) -> str:
    config = index.index
    if config is None:
        return "unknown"
    if config.kind in ("ivf_flat", "ivf_pq"):
        text = f"{config.kind}, nlist {config.nlist}, nprobe {config.nprobe}"
        codes = f", {config.pq_subquantizers} bytes a code" if config.pq_subquantizers else ""
        return text + codes
    if config.kind == "hnsw":
        return f"hnsw, {config.hnsw_links} links, ef_search {config.hnsw_ef_search}"
    return "flat (exact)"


def _kind_rule(spec: StudySpec) -> str:
    if spec.training.index.kind != "auto":
        return f"training.index.kind: {spec.training.index.kind}"
    return (
        f"training.index.kind auto: exact search (flat) up to {EXACT_SEARCH_MAX_PASSAGES:,} "
        "passages, ivf_flat above"
    )


def _encode_text(index: IndexForecast) -> str:
    if index.encode_gpu_s is None or index.encode_cpu_s is None:
        return "unknown"
    gpu, cpu = _device_time(index.encode_gpu_s, "GPU"), _device_time(index.encode_cpu_s, "CPU")
    return f"{gpu}, or {cpu}"


def _encode_how(index: IndexForecast, spec: StudySpec) -> str:
    tokens = spec.training.embedder_max_length
    cached = ""
    if index.cached_vectors is not None:
        cached = (
            f"; the cache holds vectors of this shape ({index.cached_vectors.name}): nothing is "
            "encoded if they are this embedder's"
        )
    return (
        f"every passage at {tokens} tokens (training.embedder_max_length) on one device{cached}; "
        "`ragsweep index` shares it among a cluster's GPUs (or CPUs)"
    )


def _node_how(index: IndexForecast, spec: StudySpec) -> str:
    config = index.index
    assert config is not None  # the caller returned early without one
    ids = "; + the corpus' id index" if spec.data.corpus_path or spec.data.corpus_hub_name else ""
    if config.kind == "flat":
        searched = "every vector (each search reads them all)"
    elif config.kind == "hnsw":
        searched = "the whole graph and its vectors"
    else:
        searched = (
            f"the inverted lists {index.questions_searched:,} questions visit, nprobe of nlist "
            f"each ({index.lists_visited or 0:.0%} of them)"
        )
    return f"one copy in the page cache for all the node's trials: {searched}{ids}"


def _trial_how(index: IndexForecast, spec: StudySpec) -> str:
    config = index.index
    assert config is not None  # the caller returned early without one
    parts = ["the vector rows it gathers"]
    if config.kind in ("ivf_flat", "ivf_pq"):
        parts.append("the IVF centroids FAISS reads into each process")
    if not (spec.data.corpus_path or spec.data.corpus_hub_name):
        parts.append("the corpus' id index (in memory)")
    if index.trial_device_bytes:
        parts.append("on a GPU, flat search copies every vector to it")
    return ", ".join(parts) + "; never the whole vectors in host memory"


def _index_note() -> Text:
    """Where the index is built today, what is shared, and the model behind the figures."""
    return Text(
        "index: the vectors and FAISS index are cached by (embedder weights, corpus fingerprint, "
        "training.embedder_max_length) and shared by every study that uses them; each node "
        "memory-maps them, so its trials share one copy through the page cache. `ragsweep index` "
        "(and launch, where the vectors are missing) encodes the corpus once on the Ray cluster, "
        "in shards of 65,536 passages, one worker per GPU (else per CPU); a corpus of one shard is "
        "encoded in the launch's own process, and `ragsweep train` encodes in its own. "
        f"{encode_note()}; disk and memory: FAISS's bytes per vector (IVF-Flat 4 D + 8, IVF-PQ "
        "m + 8, HNSW 4 D + 8 M), IVF lists visited as if drawn at random: 1 - (1 - nprobe / "
        "nlist) ^ questions",
        style="dim",
    )


def _device_time(seconds: float, device: str) -> str:
    """Device-hours from one hour up (what a cluster is billed in), a duration on one below."""
    if seconds < 3600:
        return f"{_duration(seconds)} on one {device}"
    return f"{seconds / 3600:,.1f} {device}-hours"


def _bytes_text(n_bytes: int) -> str:
    """GiB from 1 GiB up, MiB below: a trial's index memory is often a few MiB."""
    if n_bytes >= 2**30:
        return gib_text(n_bytes)
    return f"{n_bytes / 2**20:.1f} MiB"
