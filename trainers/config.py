"""The resolved configuration of one trial: data, models, training and the two learning rates.

These models are the single source of truth for a trial. ``search`` builds them from a study spec;
``TrialConfig.model_dump(mode="json")`` is what is stored with every trial and what ``reproduce``
reads back.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from trainers.errors import ConfigError
from trainers.methods import METHODS, method_names

__all__ = [
    "EMBEDDER_ALIASES",
    "EXACT_SEARCH_MAX_PASSAGES",
    "GENERATOR_ALIASES",
    "METHODS",
    "PAPER_PROMPT",
    "CorpusColumns",
    "DataConfig",
    "GeneratedDataConfig",
    "IndexConfig",
    "Method",
    "ModelsConfig",
    "TrainingConfig",
    "TrialConfig",
    "VectorDtype",
]


def _device_name(name: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise ValueError(f"'{name}' is not a device; use auto, cpu, cuda or cuda:N")
    return name


# Counts past these are typos (an exponent too many), not settings anyone trains with: refused
# before a trial runs for days or asks for terabytes.
_Count = Annotated[int, Field(gt=0, le=1_000_000)]
_Small = Annotated[int, Field(gt=0, le=1000)]


def _registered(name: str) -> str:
    if name not in method_names():
        raise ValueError(f"unknown method '{name}'; use one of {', '.join(method_names())}")
    return name


# A method's name: one declared in trainers.methods, the paper's or one registered since.
Method = Annotated[str, AfterValidator(_registered)]

# The paper's prompt (section 4): an instruction, then Context / Question / Answer sections.
PAPER_PROMPT = (
    "You are a helpful general knowledge expert. Answer the question using the context. "
    "Reply with the answer only.\n"
    "### Context:\n{context}\n"
    "### Question:\n{question}\n"
    "### Answer:\n"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GeneratedDataConfig(_Strict):
    """Sizes of the built-in fictional encyclopedia (see ``trainers.data``)."""

    n_entities: _Count = 120
    two_hop_fraction: float = Field(0.4, ge=0.0, le=1.0)
    seed: int = 0


class CorpusColumns(_Strict):
    """The columns of a corpus file or hub corpus that hold each passage's id, title and text:
    the canonical names by default; for ``MedRAG/wikipedia`` the text is ``content`` (or
    ``contents``, title and text in one, with ``title: null``)."""

    id: str = Field("id", min_length=1)
    title: str | None = Field("title", min_length=1)  # None: the passages have no titles
    text: str = Field("text", min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> CorpusColumns:
        named = [name for name in (self.id, self.title, self.text) if name is not None]
        if len(set(named)) < len(named):
            raise ValueError(
                f"id, title and text name the columns {named}; give each a column of its own "
                "(title: null when the passages have no titles)"
            )
        return self


def _unset(default: object) -> Any:
    """A field left out of dumps while it holds ``default``: specs and trials stored before it
    existed dump, hash and reproduce as they did."""
    return Field(default, exclude_if=lambda value: value == default)


class DataConfig(_Strict):
    """Where questions and the retrieval corpus come from, and how they are split."""

    source: Literal["generated", "popqa", "hotpotqa", "jsonl"] = "generated"
    path: str | None = None  # a local file; wins over hub_name
    hub_name: str | None = None  # a Hugging Face hub dataset (needs the hub)
    hub_split: str | None = None  # None: the source's usual split
    # The corpus, for jsonl (required) and popqa/hotpotqa, where it replaces the questions' own
    # paragraphs (gold documents are then the passages titled like the question's): a JSONL or
    # Parquet file of {id, title, text}, or a Hugging Face hub corpus, not both.
    corpus_path: str | None = None
    corpus_hub_name: str | None = _unset(None)  # e.g. MedRAG/wikipedia
    corpus_hub_subset: str | None = _unset(None)  # the hub corpus' configuration, if it has some
    corpus_hub_split: str = _unset("train")
    corpus_columns: CorpusColumns = _unset(CorpusColumns())
    n_train: _Count | None = 96  # None: all that remain after validation
    n_validation: _Count = 48
    # Held out from the search: scored too (test_em, test_f1, test_recall_at_k; a launch scores
    # the trials that lead their stage) but learning rates are picked on validation alone, so the
    # chosen run's test figure is not the selection's own. 0: no test split.
    n_test: int = Field(0, ge=0, le=1_000_000)
    split_seed: int = 0
    generated: GeneratedDataConfig = GeneratedDataConfig()

    @model_validator(mode="after")
    def _needs_a_location(self) -> DataConfig:
        if self.corpus_path and self.corpus_hub_name:
            raise ValueError(
                "data.corpus_path and data.corpus_hub_name both name a corpus; keep one"
            )
        has_corpus = bool(self.corpus_path or self.corpus_hub_name)
        if self.source == "jsonl" and not (self.path and has_corpus):
            raise ValueError(
                "data.source 'jsonl' needs data.path and data.corpus_path (or "
                "data.corpus_hub_name); set both"
            )
        if self.source in ("popqa", "hotpotqa") and not (self.path or self.hub_name):
            raise ValueError(f"data.source '{self.source}' needs data.path or data.hub_name")
        if not self.corpus_hub_name and "corpus_hub_subset" in self.model_fields_set:
            raise ValueError(
                "data.corpus_hub_subset needs data.corpus_hub_name; set it or remove the subset"
            )
        if not self.corpus_hub_name and "corpus_hub_split" in self.model_fields_set:
            raise ValueError(
                "data.corpus_hub_split needs data.corpus_hub_name; set it or remove the split"
            )
        if not has_corpus and self.corpus_columns != CorpusColumns():
            raise ValueError(
                "data.corpus_columns maps the columns of data.corpus_path or "
                "data.corpus_hub_name; set one of them or remove data.corpus_columns"
            )
        return self


# Built-in model names; anything else is a local folder or a Hugging Face hub id.
EMBEDDER_ALIASES: tuple[str, ...] = ("minilm", "tiny")
GENERATOR_ALIASES: tuple[str, ...] = ("smollm2-135m", "tiny")


class ModelsConfig(_Strict):
    """The embedder E and generator G: a built-in alias, a Hugging Face id or a local path."""

    embedder: str = "minilm"
    generator: str = "smollm2-135m"
    generator_finetune: Literal["lora", "qlora", "full"] = "lora"
    lora_rank: _Small = 16  # the paper's QLoRA rank
    lora_alpha: PositiveInt = 32
    # 0 by default: peft materialises a dropped-out copy of every adapter input, which doubles a
    # CPU training step (measured: 15 s -> 8 s for SmolLM2 at batch 8); raise it for large models.
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)


# ``index.kind: auto`` searches exactly up to this many passages (a flat search of a million
# 384-dimensional vectors reads 1.5 GB per batch of questions) and with IVF above it.
EXACT_SEARCH_MAX_PASSAGES = 1_000_000

# ivf_pq codes are 8 bits a sub-quantizer: 256 centroids each, which k-means needs at least as many
# passages to train.
_PQ_CENTROIDS = 256


VectorDtype = Literal["float32", "float16"]


class IndexConfig(_Strict):
    """The FAISS index that searches the frozen document vectors: exact, or approximate for large
    corpora. A built index is cached per (vectors, kind, build parameters); ``nprobe`` and
    ``hnsw_ef_search`` are search-time settings and reuse it."""

    # auto: flat up to EXACT_SEARCH_MAX_PASSAGES passages, ivf_flat above (whose agreement with
    # exact search is a matter of nprobe; ivf_pq trades more of it for a smaller index).
    kind: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = "auto"
    # IVF cells. None: 4 * sqrt(passages), the low end of FAISS's guideline (4 to 16 * sqrt(N)),
    # and at most passages / 39, the fewest training points per cell k-means accepts unwarned.
    nlist: _Count | None = None
    # IVF cells searched per question. None: 1/32 of nlist and at least 16, erring towards
    # recall; measure agreement with exact search before lowering it.
    nprobe: _Count | None = None
    # ivf_pq: 8-bit sub-quantizers per vector (bytes per vector); must divide the vector
    # dimension. None: dimension / 8 (48 bytes for MiniLM's 384, against 1536 in float32).
    pq_subquantizers: _Small | None = None
    # hnsw: graph links per vector (FAISS's M); more links, better recall, a larger graph.
    # None: 32.
    hnsw_links: Annotated[int, Field(ge=2, le=256)] | None = None
    # hnsw: candidates kept while searching (FAISS's efSearch; at least k is used). None: 128.
    hnsw_ef_search: _Small | None = None
    # How the document vectors are stored: float16 halves the vectors file and the page cache a
    # node holds for exact search (30M x 384: 23 GB instead of 46), for scores that differ in the
    # fourth decimal. FAISS builds and searches in float32, converting a chunk at a time.
    vector_dtype: VectorDtype = _unset("float32")

    @model_validator(mode="after")
    def _parameters_fit_the_kind(self) -> IndexConfig:
        # A parameter the kind ignores is a mistake in the spec, not a setting: say so.
        applies = {
            "nlist": ("auto", "ivf_flat", "ivf_pq"),
            "nprobe": ("auto", "ivf_flat", "ivf_pq"),
            "pq_subquantizers": ("ivf_pq",),
            "hnsw_links": ("hnsw",),
            "hnsw_ef_search": ("hnsw",),
        }
        for name, kinds in applies.items():
            if self.kind not in kinds and getattr(self, name) is not None:
                raise ValueError(
                    f"{name} applies to kind {' or '.join(k for k in kinds if k != 'auto')} "
                    f"only, not {self.kind}; remove it or change kind"
                )
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise ValueError(
                f"nprobe {self.nprobe} exceeds nlist {self.nlist}; set nprobe at most nlist"
            )
        return self

    def resolve(self, *, passages: int, dimension: int) -> IndexConfig:
        """This configuration for a corpus of ``passages`` vectors of ``dimension``: the kind
        chosen (never auto) and every parameter it uses filled in, the others left None."""
        kind = self.kind
        if kind == "auto":
            kind = "flat" if passages <= EXACT_SEARCH_MAX_PASSAGES else "ivf_flat"
        if kind == "flat":
            return IndexConfig(kind="flat", vector_dtype=self.vector_dtype)
        if kind == "hnsw":
            return IndexConfig(
                kind="hnsw",
                hnsw_links=self.hnsw_links or 32,
                hnsw_ef_search=self.hnsw_ef_search or 128,
                vector_dtype=self.vector_dtype,
            )
        nlist = self.nlist or max(1, min(4 * math.isqrt(passages), passages // 39))
        if nlist > passages:
            raise ConfigError(
                f"training.index.nlist is {nlist} but the corpus has only {passages} passages; "
                "lower training.index.nlist"
            )
        nprobe = min(nlist, self.nprobe or max(16, nlist // 32))  # FAISS searches at most nlist
        fields: dict[str, object] = {
            "kind": kind,
            "nlist": nlist,
            "nprobe": nprobe,
            "vector_dtype": self.vector_dtype,
        }
        if kind == "ivf_pq":
            if passages < _PQ_CENTROIDS:
                raise ConfigError(
                    f"training.index.kind ivf_pq needs at least {_PQ_CENTROIDS} passages to train "
                    f"its codes; the corpus has {passages}: use kind flat"
                )
            subquantizers = self.pq_subquantizers or max(1, dimension // 8)
            if dimension % subquantizers:
                raise ConfigError(
                    f"training.index.pq_subquantizers is {subquantizers} but the vectors have "
                    f"{dimension} dimensions; use a divisor of {dimension}"
                )
            fields["pq_subquantizers"] = subquantizers
        return IndexConfig.model_validate(fields)


class TrainingConfig(_Strict):
    """Everything about how a phase trains and how a trial is evaluated."""

    epochs: _Small = 1  # the paper: 1 epoch per model (per phase for two_phase)
    batch_size_embedder: _Count = 8  # the paper's MNRL batch size
    batch_size_generator: _Count = 8
    k: _Small = 5  # documents retrieved per question
    retrieval_temperature: PositiveFloat = 0.05  # unit-norm vectors: scores are cosines
    mnrl_scale: PositiveFloat = 20.0
    # The paper uses in-batch negatives only (0); each mined negative adds the question's
    # top-ranked non-gold passage under the phase's starting E.
    mnrl_hard_negatives: int = Field(0, ge=0, le=1000)
    ft_gen_objective: Literal["nll_concat", "rag_token"] = "nll_concat"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: PositiveFloat = 1.0
    max_question_tokens: _Count = 64
    max_doc_tokens: _Count = 96  # per retrieved passage, in generator tokens
    max_answer_tokens: _Count = 24
    max_new_tokens: _Count = 16
    embedder_max_length: _Count = 128  # passage truncation when building the index
    # The FAISS index searched (auto: exact up to a million passages). Left out of dumps while
    # default, as index_cache, so that trials stored before it hash and reproduce as they did.
    index: IndexConfig = Field(IndexConfig(), exclude_if=lambda index: index == IndexConfig())
    # False re-encodes the corpus in every trial instead of reading the cached vectors (what
    # benchmarks/index_cache.py compares). Left out of dumps while on, so the hashes and records of
    # specs that never set it stay as they were.
    index_cache: bool = Field(True, exclude_if=lambda on: on)
    # RAG-Token / RAG-Sequence steps forward k prompts per question: a batch of 8 at k = 5 holds
    # 40 rows of activations. A number here runs that many questions per forward and accumulates
    # the gradients over the batch: the same loss (a mean over questions), a fraction of the
    # memory. None: as many questions as fit in activation_memory_mb (trainers.memory forecasts
    # a forward's activations from the generator's shape and the token caps); left out of dumps
    # then, as index_cache.
    rag_questions_per_forward: PositiveInt | None = Field(None, exclude_if=lambda n: n is None)
    # The activation memory one training forward of the generator may hold, in MiB.
    activation_memory_mb: PositiveInt = Field(1024, exclude_if=lambda mb: mb == 1024)
    # How full the data's prompts fill the token caps (question, k passages, answer), for the
    # memory and time forecasts (trainers.memory.token_caps): PopQA's passages fill
    # max_doc_tokens almost to the cap, the demo's half. None: measured from the training
    # questions (trainers.prompts.prompt_fill), once by a launch for the memory each trial asks
    # Ray for, and by a trial itself where it runs without a launch; left out of dumps then.
    prompt_fill: float | None = Field(None, gt=0.0, le=4.0, exclude_if=lambda fill: fill is None)
    # Activation checkpointing of the generator while it trains: each decoder layer keeps only its
    # input and recomputes the rest in the backward pass. A RAG-Token step of SmolLM2-135M on 40
    # prompt rows held ~10 GB of activations in fp32 without it (every layer's attention and MLP
    # intermediates); with it, about one layer's worth plus the layer inputs, for one more forward
    # of compute. The embedder is left alone: it encodes short questions only (benchmarks/memory.py).
    gradient_checkpointing: bool = Field(True, exclude_if=lambda on: on)
    eval_batch_size: _Count = 16
    # What evaluation scores. "answers": retrieve top-k, generate, and score EM, F1 and Recall@k.
    # "retrieval": retrieve only and score Recall@k, for studies of the embedder (objective
    # recall_at_k): on PopQA at fp32 on one CPU thread generating an answer costs ~5 s a
    # question, retrieving it ~12 ms (benchmarks/retrieval_eval.py: 445x). Left out of dumps
    # when "answers", so older configs hash as they did.
    evaluate: Literal["answers", "retrieval"] = Field(
        "answers", exclude_if=lambda mode: mode == "answers"
    )
    prompt_template: str = PAPER_PROMPT
    precision: Literal["auto", "fp32", "bf16"] = (
        "auto"  # auto: bf16 autocast where native, else fp32
    )
    device: Annotated[str, AfterValidator(_device_name)] = (
        "auto"  # auto: cuda when present, else cpu
    )

    @model_validator(mode="after")
    def _template_has_fields(self) -> TrainingConfig:
        for field in ("{context}", "{question}"):
            if field not in self.prompt_template:
                raise ValueError(f"training.prompt_template must contain {field}")
        return self


class TrialConfig(_Strict):
    """One trial: a method, its two learning rates, a seed, and the settings above."""

    method: Method
    lr_embedder: PositiveFloat | None = None
    lr_generator: PositiveFloat | None = None
    seed: int = 0
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    training: TrainingConfig = TrainingConfig()
    # Phase name -> checkpoint folder of an earlier run: the phase is not run, its output is loaded
    # (independent reuses ft_embed's and ft_gen's models; two_phase reuses ft_gen as phase 1).
    reuse: dict[str, str] = Field(default_factory=dict)
