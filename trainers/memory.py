"""What a trial holds in memory at its peak, forecast from model shapes and the token caps.

One model serves two callers: a trial picks how many questions a RAG step forwards at once from it
(``training.rag_questions_per_forward`` left unset), and ``search``'s plan asks Ray for each
stage's peak with it, so Ray queues a trial that would not fit instead of starting it. Token counts
are taken at the spec's caps, filled as the data's prompts fill them (``training.prompt_fill``,
else ``CAP_FILL``); the per-layer activation counts were calibrated against peaks measured on the
demo models (``benchmarks/memory.py``, SmolLM2-135M + MiniLM, fp32 and bf16, with and without
checkpointing).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainers.config import TrainingConfig
from trainers.methods import Phase

if TYPE_CHECKING:  # the model is pure arithmetic: search's plan uses it without loading torch
    import torch

__all__ = [
    "CAP_FILL",
    "MiB",
    "bound_allocator",
    "ModelShape",
    "TokenCaps",
    "forward_activation_bytes",
    "questions_per_forward",
    "resume_point_bytes",
    "shape_of",
    "TrialMemory",
    "token_caps",
    "trial_memory",
]

MiB = 2**20

# The paper prompt's instruction, section headers and passage titles, in generator tokens.
PROMPT_OVERHEAD_TOKENS = 40
# Texts fill their token caps only partly: the demo's prompts 49% (90th percentile), PopQA's and
# HotPotQA's, whose passages reach max_doc_tokens, 82-86% (benchmarks/prompt_fill.py). Where the
# data's own fill is not known (``training.prompt_fill`` unset: a plan made without reading the
# data), the forecast assumes this, a little above the demo's.
CAP_FILL = 0.55

# Activations a decoder layer keeps per token for its backward pass, in elements of the hidden
# size h and the MLP size i: the norms' inputs and outputs, q/k/v and the attention output, the
# residuals (~12 h), and the MLP's gate, up, activation and product (~5 i). Calibrated on SmolLM2.
_LAYER_HIDDEN_ELEMENTS = 12
_LAYER_MLP_ELEMENTS = 5
# A forward without grad keeps nothing, but its transients (a layer's intermediates, the attention
# mask and rotary tables, allocator slack) measured 2.4 layers' worth at the peak (SmolLM2, greedy
# evaluation of 16 concatenated prompts in fp32).
_NO_GRAD_LAYERS = 2.4
# Bytes per activation element: fp32, or bf16 autocast (matmul outputs in bf16, norms and
# softmax kept in fp32).
_BYTES_FP32 = 4.0
_BYTES_BF16 = 2.5
# Copies of the kept logits (R, T + 1, V) alive at once: the logits, their fp32 log-softmax and its
# gradient.
_LOGIT_COPIES = 3
# A 4-bit weight with its NF4 block scales (bitsandbytes, block size 64).
_BYTES_4BIT = 0.56
# Python, torch, transformers, sentence-transformers, FAISS and a Ray worker, before any model.
# Between what was measured: a `ragsweep train` process holds ~330 MiB; a reused Ray trial worker
# peaked ~700 MiB above the same trial in such a process (Ray's core, earlier trials' leftovers).
_RUNTIME_BYTES = 650 * MiB
# What CUDA and its kernels take on a GPU before any tensor.
_CUDA_CONTEXT_BYTES = 500 * MiB
# AdamW keeps two moments per trained weight, plus the gradient itself.
_ADAM_MOMENTS = 2
_OPTIMIZER_COPIES = _ADAM_MOMENTS + 1


# glibc's mallopt parameter for the size above which an allocation gets its own memory mapping,
# and the size set: 1 MiB bounded the peak best but its page faults slowed greedy generation by
# 10-20%; 4 MiB still maps every activation of a multi-question forward.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 4 * MiB


def bound_allocator() -> None:
    """Make this process give freed tensor memory back to the OS at once (glibc only).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which tensors
    come from its heap and what they free stays resident, scattered, while the next step allocates
    anew: a checkpointed RAG-Token step of SmolLM2 (fp32, 40 prompt rows) peaked at 5.5 GiB
    resident against 2.0 GiB with a fixed 1 MiB threshold and 2.4 GiB with 8 MiB, for the same
    tensors. A fixed threshold gives every tensor above it its own mapping, unmapped when freed.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator keeps its own policy


@dataclass(frozen=True)
class ModelShape:
    """What a model's memory depends on. ``layers`` and below are 0 for a model whose activations
    are not forecast (the embedder's, which encodes short questions only)."""

    params: int  # all parameters, embeddings included (trainers.models.parameter_counts)
    lora_params_per_rank: int = 0  # adapter weights per unit of rank, LoRA on "all-linear"
    layers: int = 0
    hidden: int = 0
    intermediate: int = 0
    kv_hidden: int = 0  # width of the keys (= the values) per layer: grouped-query attention
    vocab: int = 0


@dataclass(frozen=True)
class TokenCaps:
    """Tokens per row of each kind of generator forward, at the caps as real text fills them."""

    single_prompt: float  # one passage, the question and the answer (RAG objectives)
    concat_prompt: float  # k passages, the question and the answer (nll_concat, evaluation)
    answer: int  # answer tokens whose logits are kept


def token_caps(training: TrainingConfig) -> TokenCaps:
    """Tokens per row for ``training``'s caps, filled to ``training.prompt_fill`` (else
    ``CAP_FILL``)."""
    question, answer = training.max_question_tokens, training.max_answer_tokens
    fill = CAP_FILL if training.prompt_fill is None else training.prompt_fill
    return TokenCaps(
        single_prompt=PROMPT_OVERHEAD_TOKENS + fill * (question + training.max_doc_tokens + answer),
        concat_prompt=PROMPT_OVERHEAD_TOKENS
        + fill * (question + training.k * training.max_doc_tokens + answer),
        answer=answer,
    )


def shape_of(model: torch.nn.Module) -> ModelShape:
    """The shape of a loaded transformers causal LM (a peft wrapper included)."""
    # A transformers PretrainedConfig; torch types any Module attribute as Tensor | Module.
    config: Any = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        kv_hidden=getattr(config, "num_key_value_heads", heads) * head_dim,
        vocab=config.vocab_size,
    )


def forward_activation_bytes(
    generator: ModelShape,
    *,
    rows: int,
    tokens_per_row: float,
    answer_tokens: int,
    bf16: bool,
    grad: bool,
    checkpointing: bool,
) -> float:
    """Activation memory of one generator forward (and its backward, with ``grad``) over ``rows``
    prompts: with checkpointing each layer keeps its input and one layer is recomputed at a time;
    without, every layer keeps all of its intermediates; without grad, one layer's are transient."""
    element = _BYTES_BF16 if bf16 else _BYTES_FP32
    tokens = rows * tokens_per_row
    layer = _LAYER_HIDDEN_ELEMENTS * generator.hidden + _LAYER_MLP_ELEMENTS * generator.intermediate
    if not grad:
        per_token = _NO_GRAD_LAYERS * layer
    elif checkpointing:
        per_token = generator.layers * generator.hidden + layer
    else:
        per_token = generator.layers * layer
    logits = rows * (answer_tokens + 1) * generator.vocab * _BYTES_FP32 * _LOGIT_COPIES
    return tokens * per_token * element + logits


def questions_per_forward(
    generator: ModelShape,
    training: TrainingConfig,
    *,
    bf16: bool,
    grad: bool,
    checkpointing: bool,
) -> int:
    """The most questions of a batch (k single-passage rows each) whose RAG forward fits in
    ``training.activation_memory_mb``; at least 1, at most the batch."""
    caps = token_caps(training)
    per_question = forward_activation_bytes(
        generator,
        rows=training.k,
        tokens_per_row=caps.single_prompt,
        answer_tokens=caps.answer,
        bf16=bf16,
        grad=grad,
        checkpointing=checkpointing,
    )
    fitting = math.floor(training.activation_memory_mb * MiB / per_question)
    return max(1, min(training.batch_size_generator, fitting))


@dataclass(frozen=True)
class TrialMemory:
    """A trial's forecast peak: resident memory of its process, and GPU memory (0 on a CPU)."""

    host_bytes: float
    device_bytes: float


def trial_memory(
    phases: tuple[Phase, ...],
    *,
    embedder: ModelShape,
    generator: ModelShape,
    generator_trainable: int,
    training: TrainingConfig,
    bf16: bool,
    on_gpu: bool,
    quantized: bool = False,
) -> TrialMemory:
    """The peak of a trial that trains ``phases`` (reused phases left out) and then evaluates:
    both models' weights, and the largest of the phases' optimizer state plus step activations and
    the evaluation's generation (none with ``training.evaluate`` retrieval); on a CPU all of it plus the runtime is resident, on a GPU the
    process holds the runtime and the weights while it loads them. ``quantized``: the generator's
    base weights are 4-bit (QLoRA)."""
    caps = token_caps(training)
    generator_bytes = _BYTES_4BIT if quantized else _BYTES_FP32
    weights = embedder.params * _BYTES_FP32 + generator.params * generator_bytes
    evaluation = forward_activation_bytes(
        generator,
        rows=training.eval_batch_size,
        tokens_per_row=caps.concat_prompt + training.max_new_tokens,
        answer_tokens=0,
        bf16=bf16,
        grad=False,
        checkpointing=False,
    ) + _kv_cache_bytes(generator, training, caps, bf16)
    # Retrieval-only evaluation encodes the questions and generates nothing.
    peaks = [evaluation if training.evaluate == "answers" else 0.0]
    for phase in phases:
        trained = _trained_params(phase, embedder, generator_trainable)
        optimizer = trained * _BYTES_FP32 * _OPTIMIZER_COPIES
        peaks.append(optimizer + _step_activation_bytes(phase, generator, training, caps, bf16))
    if on_gpu:
        return TrialMemory(_RUNTIME_BYTES + weights, _CUDA_CONTEXT_BYTES + weights + max(peaks))
    return TrialMemory(_RUNTIME_BYTES + weights + max(peaks), 0.0)


def resume_point_bytes(
    phases: tuple[Phase, ...], *, embedder: ModelShape, generator_trainable: int
) -> float:
    """The size of a trial's resume point (trainers.resume) while it trains ``phases``: an fp32
    copy of each trained model's trained weights (all the embedder's; the generator's
    ``generator_trainable``), and the largest phase's AdamW moments (two per trained weight). A
    point also briefly holds that much host memory while it is written."""
    embedder_trained = any(phase.trains_embedder for phase in phases)
    generator_trained = any(phase.trains_generator for phase in phases)
    weights = (embedder.params if embedder_trained else 0) + (
        generator_trainable if generator_trained else 0
    )
    moments = max(
        (_trained_params(phase, embedder, generator_trainable) for phase in phases), default=0
    )
    return (weights + _ADAM_MOMENTS * moments) * _BYTES_FP32


def _trained_params(phase: Phase, embedder: ModelShape, generator_trainable: int) -> int:
    """The weights ``phase``'s optimizer updates: all the embedder's, the generator's trainable."""
    return (embedder.params if phase.trains_embedder else 0) + (
        generator_trainable if phase.trains_generator else 0
    )


def _step_activation_bytes(
    phase: Phase, generator: ModelShape, training: TrainingConfig, caps: TokenCaps, bf16: bool
) -> float:
    """The generator activations of one training forward of ``phase`` (MNRL runs no generator)."""
    if phase.objective == "mnrl":
        return 0.0
    checkpointing = phase.trains_generator and training.gradient_checkpointing
    if phase.objective == "nll_concat":
        rows, tokens = training.batch_size_generator, caps.concat_prompt
    else:
        per_forward = training.rag_questions_per_forward or questions_per_forward(
            generator, training, bf16=bf16, grad=phase.trains_generator, checkpointing=checkpointing
        )
        rows, tokens = per_forward * training.k, caps.single_prompt
    return forward_activation_bytes(
        generator,
        rows=rows,
        tokens_per_row=tokens,
        answer_tokens=caps.answer,
        bf16=bf16,
        grad=phase.trains_generator,
        checkpointing=checkpointing,
    )


def _kv_cache_bytes(
    generator: ModelShape, training: TrainingConfig, caps: TokenCaps, bf16: bool
) -> float:
    tokens = training.eval_batch_size * (caps.concat_prompt + training.max_new_tokens)
    element = 2 if bf16 else 4
    return 2 * generator.layers * generator.kv_hidden * tokens * element
