"""What the retrieval index costs, forecast from the spec: no model is loaded, no corpus read.

The model behind each figure, for N passages of D dimensions:

- N: the corpus' row count from where it is cheap to read: the ``datasets`` cache of a corpus
  file or hub corpus (written the first time it is read, with the corpus manifest), a Parquet
  file's metadata, a table of known hub corpora, the generated encyclopedia itself; otherwise
  unknown until the corpus is read.
- the kind: ``training.index`` resolved for N (:meth:`trainers.IndexConfig.resolve`).
- encode: every passage at ``training.embedder_max_length`` tokens through the embedder
  (:func:`search.forecast.encode_seconds`).
- disk: the vectors file, N x D x 4 bytes (2 in float16), and for approximate kinds the FAISS index file (FAISS's
  own figures per vector: IVF-Flat 4 D + 8, IVF-PQ m + 8, HNSW 4 D + 8 M + ~16; plus the IVF
  centroids).
- memory per node: one copy of what searches touch, in the page cache and shared by the node's
  trials (the files are memory-mapped): flat, every vector; IVF, the inverted lists a trial's
  questions visit; HNSW, the whole index file; plus the corpus' id index where it is a memory-
  mapped manifest. Memory per trial: the vector rows it gathers, the IVF centroids FAISS reads
  into each process, and the id index of a corpus held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from search.forecast import encode_seconds
from search.sizes import embedding_dimension, hub_passages
from trainers import DataConfig, IndexConfig, generate_encyclopedia, one_line

if TYPE_CHECKING:
    from search.spec import StudySpec

__all__ = ["IndexForecast", "forecast_index"]

_NPY_HEADER = 128  # numpy's .npy header for a 2-D float32 array (format 1.0, padded to 64)
_FAISS_ID = 8  # an IVF list stores each vector's int64 id beside it
_PQ_CENTROIDS = 256  # 8-bit codes: 256 centroids per sub-quantizer, D floats over all of them
# HNSW beyond 2 M int32 links at level 0: a level (int32) and an offset (int64) per vector, and
# the upper levels' links (measured: 16 bytes a vector at M = 32).
_HNSW_EXTRA = 16
# The corpus' id index: each id as fixed-width bytes (the longest id's width; 32 assumed) and its
# row as an int64.
_ID_INDEX_BYTES = 32 + 8


@dataclass(frozen=True)
class IndexForecast:
    """The index a study's trials search, and what building and holding it costs."""

    corpus: str  # how the corpus is named, e.g. "hub corpus 'MedRAG/wikipedia'"
    passages: int | None  # None: unknown until the corpus is read
    counted_from: str  # where ``passages`` comes from, or why it is unknown
    dimension: int | None  # None: the embedder is not in the dimension table
    index: IndexConfig | None  # the kind searched, resolved (never auto); None: N or D unknown
    encode_gpu_s: float | None  # encoding every passage on one GPU
    encode_cpu_s: float | None  # ... on one CPU, fp32 (the launch's preflight encodes on CPU)
    vectors_bytes: int | None  # the cached vectors file
    index_file_bytes: int | None  # the FAISS index file beside it; 0 for flat (no file)
    node_bytes: int | None  # page cache a node holds for its trials, shared, whatever their number
    trial_bytes: int | None  # each trial's own memory for retrieval
    trial_device_bytes: int  # each trial's GPU memory for retrieval (flat on a GPU)
    questions_searched: int  # questions a trial searches at least (validation and test)
    lists_visited: float | None  # IVF: the share of inverted lists those questions visit
    cached_vectors: Path | None  # a cached vectors file of this shape; None: none, or not looked

    @property
    def disk_bytes(self) -> int | None:
        """The vectors and the FAISS index file together."""
        if self.vectors_bytes is None or self.index_file_bytes is None:
            return None
        return self.vectors_bytes + self.index_file_bytes


def forecast_index(spec: StudySpec, *, cache_dir: Path | None = None) -> IndexForecast:
    """The index ``spec``'s trials search and its cost; ``cache_dir``: where the document vectors
    are cached, to say whether vectors of this shape are there already (None: not checked)."""
    data, training = spec.data, spec.training
    passages, counted_from = _corpus_size(data)
    dimension = embedding_dimension(spec)
    questions = data.n_validation + data.n_test
    encode = None if passages is None else encode_seconds(spec, passages)
    index = None
    if passages is not None and dimension is not None:
        index = training.index.resolve(passages=passages, dimension=dimension)
    sizes = None if index is None else _sizes(index, passages or 0, dimension or 0, questions, spec)
    mapped_ids = bool(data.corpus_path or data.corpus_hub_name)
    cached = None
    if cache_dir is not None and passages is not None and dimension is not None:
        dtype = np.dtype(training.index.vector_dtype)
        cached = _cached_vectors(cache_dir, passages, dimension, dtype)
    return IndexForecast(
        corpus=_corpus_name(data),
        passages=passages,
        counted_from=counted_from,
        dimension=dimension,
        index=index,
        encode_gpu_s=None if encode is None else encode[0],
        encode_cpu_s=None if encode is None else encode[1],
        vectors_bytes=None if sizes is None else sizes.vectors,
        index_file_bytes=None if sizes is None else sizes.index_file,
        node_bytes=None if sizes is None else sizes.node + (sizes.ids if mapped_ids else 0),
        trial_bytes=None if sizes is None else sizes.trial + (0 if mapped_ids else sizes.ids),
        trial_device_bytes=0 if sizes is None else sizes.trial_device,
        questions_searched=questions,
        lists_visited=None if sizes is None else sizes.lists_visited,
        cached_vectors=cached,
    )


@dataclass(frozen=True)
class _Sizes:
    vectors: int
    index_file: int
    node: int  # what searches touch, shared
    trial: int  # rows gathered and per-process FAISS state
    trial_device: int
    ids: int  # the corpus' id index
    lists_visited: float | None  # IVF only


def _sizes(
    index: IndexConfig, passages: int, dimension: int, questions: int, spec: StudySpec
) -> _Sizes:
    vectors = passages * dimension * np.dtype(index.vector_dtype).itemsize
    centroids = (index.nlist or 0) * dimension * 4
    training = spec.training
    # Rows gathered at once: a RAG step scores k passages of each question of a batch, MNRL the
    # gold and mined passages of each, evaluation k passages of each question of a batch.
    rows = max(
        training.batch_size_generator * training.k,
        training.batch_size_embedder * (1 + training.mnrl_hard_negatives),
        training.eval_batch_size * training.k,
    )
    trial = rows * dimension * 4
    index_file, node, trial_device, visited = 0, vectors, 0, None
    if index.kind == "flat" and spec.resources.gpus > 0:
        trial_device = vectors  # FAISS copies the vectors onto each trial's GPU
    elif index.kind in ("ivf_flat", "ivf_pq"):
        code = dimension * 4 if index.kind == "ivf_flat" else index.pq_subquantizers or 0
        lists = passages * (code + _FAISS_ID)
        codebooks = _PQ_CENTROIDS * dimension * 4 if index.kind == "ivf_pq" else 0
        index_file = lists + centroids + codebooks
        visited = _lists_visited(index, questions)
        node = round(lists * visited)
        trial += centroids + codebooks  # FAISS reads the quantizer into each process
    elif index.kind == "hnsw":
        links = 2 * (index.hnsw_links or 0) * 4
        index_file = passages * (dimension * 4 + links + _HNSW_EXTRA)
        node = index_file  # a graph walk lands anywhere: over many questions, on every page
    return _Sizes(
        vectors=vectors + _NPY_HEADER,
        index_file=index_file,
        node=node,
        trial=trial,
        trial_device=trial_device,
        ids=passages * _ID_INDEX_BYTES,
        lists_visited=visited,
    )


def _lists_visited(index: IndexConfig, questions: int) -> float:
    """The expected fraction of IVF lists ``questions`` visit, ``nprobe`` of ``nlist`` each, as if
    each question's lists were drawn at random: 1 - (1 - nprobe / nlist) ** questions."""
    probed = (index.nprobe or 0) / (index.nlist or 1)
    return float(1.0 - (1.0 - probed) ** max(questions, 1))


def _corpus_name(data: DataConfig) -> str:
    if data.corpus_path:
        return f"data.corpus_path '{data.corpus_path}'"
    if data.corpus_hub_name:
        return f"hub corpus '{data.corpus_hub_name}'"
    if data.source == "generated":
        return "the generated encyclopedia"
    return f"the paragraphs of the {data.source} questions"


def _corpus_size(data: DataConfig) -> tuple[int | None, str]:
    """(passages, where the count comes from or why it is unknown)."""
    if data.corpus_path:
        return _file_rows(Path(data.corpus_path).expanduser())
    if data.corpus_hub_name:
        return _hub_rows(data)
    if data.source == "generated":
        # Generating it takes milliseconds and no model: count it exactly.
        documents, _ = generate_encyclopedia(data.generated)
        return len(documents), "the generated encyclopedia, counted"
    return None, "unknown until the corpus is read (the questions' own paragraphs)"


def _file_rows(path: Path) -> tuple[int | None, str]:
    if not path.is_file():
        return None, f"unknown: {path} does not exist"
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_metadata(path).num_rows
        except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError: not a Parquet file
            return None, f"unknown: cannot read its Parquet metadata ({one_line(e)})"
        return int(rows), "its Parquet metadata"
    builder = {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix.lower())
    if builder is None:
        return None, "unknown: not a JSONL, JSON, CSV or Parquet file"
    rows = _datasets_cache_rows(builder, None, "train", data_files=str(path))
    if rows is None:
        return None, "unknown until the corpus is read (not yet in the datasets cache)"
    return rows, "the datasets cache"


def _hub_rows(data: DataConfig) -> tuple[int | None, str]:
    name, split = data.corpus_hub_name or "", data.corpus_hub_split
    rows = _datasets_cache_rows(name, data.corpus_hub_subset, split)
    if rows is not None:
        return rows, "the datasets cache"
    known = hub_passages(name, split) if data.corpus_hub_subset is None else None
    if known is not None:
        return known, "its published size (not in the datasets cache here)"
    return None, "unknown until the corpus is read (not in the datasets cache here)"


def _datasets_cache_rows(
    name: str, subset: str | None, split: str, *, data_files: str | None = None
) -> int | None:
    """Rows of ``split`` as the ``datasets`` cache records them (the builder finds its cached
    Arrow files and their info without reading a row); None when they are not there."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # "using the latest cached version": not for a plan
    try:
        builder = datasets.load_dataset_builder(name, subset, data_files=data_files)
    except (OSError, ValueError):
        # Offline and not cached, unreachable, not on the hub (all OSErrors), or no such subset.
        return None
    finally:
        datasets.logging.set_verbosity(verbosity)
    splits = builder.info.splits
    if not splits or split not in splits or not splits[split].num_examples:
        return None
    return int(splits[split].num_examples)


def _cached_vectors(cache_dir: Path, passages: int, dimension: int, dtype: np.dtype) -> Path | None:
    """A cached vectors file of shape (passages, dimension) and ``dtype``. Its key (the embedder's weights, the
    corpus fingerprint, the max length) needs the model, so a plan matches the shape alone."""
    for path in sorted((cache_dir / "index").glob("*.npy")):
        try:
            with path.open("rb") as file:
                if np.lib.format.read_magic(file) != (1, 0):
                    continue
                shape, _, stored = np.lib.format.read_array_header_1_0(file)
        except (OSError, ValueError):
            continue  # a file being replaced, or not an array: not the vectors sought
        if tuple(shape) == (passages, dimension) and stored == dtype:
            return path
    return None
