"""The frozen document index: passage vectors computed once, cached on disk, searched with FAISS.

Only question vectors change when the embedder trains (the index is never re-encoded, as in the
paper), so the vectors depend on (embedder weights, corpus, max length) alone; that triple is the
cache key (the corpus by its fingerprint, never its rows). ``trainers.encode`` encodes the corpus:
here as a stream of chunks into the cache file (no trial holds it whole), or beforehand shard by
shard on a cluster (``ragsweep index``, which ``launch`` runs for a corpus of many shards). The vectors
are read as a memory map of the cache file and an approximate FAISS index is built once per
(vectors, kind, build parameters) and memory-mapped too, so the trials on a node share one copy of
each through the page cache and hold in their own memory only the rows they use.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from trainers.config import IndexConfig
from trainers.corpus import Corpus, Document
from trainers.encode import (
    encode_corpus,
    mapped_vectors,
    passage_text,
    unwritable,
    vectors_path,
    write_vectors,
)
from trainers.errors import ConfigError, DataError, one_line

__all__ = ["DocumentIndex", "build_index", "passage_text"]

# (question vectors (Q, D), k) -> (scores (Q, k), document positions (Q, k))
_Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class DocumentIndex:
    """Unit-norm document vectors and a FAISS inner-product search over them."""

    corpus: Corpus  # the passages, row i encoded as doc_vectors[i]
    # (N, D) float32, or float16 (training.index.vector_dtype): a read-only memory map of the
    # cache file (in RAM when the cache is off). Never copied whole: training takes the rows it
    # scores through rows(), as float32.
    doc_vectors: np.ndarray
    index_config: IndexConfig  # the kind searched and its parameters, resolved (never auto)
    build_seconds: float  # time to encode the corpus and build the index (or to read the cache)
    cache_hit: bool  # vectors and FAISS index both read from the cache
    encoded_tokens: int  # passage tokens encoded; 0 when the vectors came from the cache
    _search: _Search

    def search(self, question_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, document positions) for each question vector: ((Q, k), (Q, k))."""
        scores, positions = self._search(
            np.ascontiguousarray(question_vectors, dtype=np.float32), k
        )
        if (positions < 0).any():
            # FAISS pads with -1 when the cells or graph nodes it visited hold fewer than k
            # passages; a -1 would silently index the last document.
            kind = self.index_config.kind
            knob = "hnsw_ef_search" if kind == "hnsw" else "nprobe"
            raise ConfigError(
                f"the {kind} index found fewer than {k} passages for a question; "
                f"raise training.index.{knob}"
            )
        return scores, positions

    def documents(self, positions: np.ndarray) -> list[list[Document]]:
        """The passages at ``positions`` (Q, k), as Q lists of k: only those rows are read."""
        flat = self.corpus.documents(positions.reshape(-1))
        width = positions.shape[1] if positions.ndim == 2 else 1
        return [flat[start : start + width] for start in range(0, len(flat), width)]

    def rows(self, positions: np.ndarray | Sequence[int], device: torch.device) -> torch.Tensor:
        """The vectors of the documents at ``positions`` (any shape S) as a frozen tensor (*S, D),
        for scores that carry a gradient to E: only these rows are read from the memory map and
        moved to ``device``, never the whole matrix."""
        wanted = np.asarray(positions, dtype=np.int64)
        gathered = np.asarray(self.doc_vectors[wanted.reshape(-1)], dtype=np.float32)  # (S, D)
        return torch.from_numpy(gathered).to(device).view(*wanted.shape, gathered.shape[-1])


def build_index(
    embedder: SentenceTransformer,
    corpus: Corpus,
    *,
    cache_dir: Path,
    max_length: int,
    index: IndexConfig | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
) -> DocumentIndex:
    """Encode the corpus with the (frozen) embedder and build the FAISS index ``index`` asks for,
    or read either from the cache where it holds them for the same key.

    ``index`` None is the default (``auto``). ``use_cache=False`` encodes and builds in memory
    and neither reads nor writes the cache.
    """
    start = time.perf_counter()
    dtype = (index or IndexConfig()).vector_dtype
    vectors_file = vectors_path(cache_dir, embedder, corpus, max_length, dtype)
    vectors_hit = use_cache and vectors_file.exists()
    encoded_tokens = 0
    if vectors_hit:
        doc_vectors = mapped_vectors(vectors_file)
    else:
        tokens: list[int] = []
        chunks = encode_corpus(
            embedder, corpus, max_length=max_length, batch_size=batch_size, tokens=tokens
        )
        if use_cache:
            write_vectors(vectors_file, len(corpus), chunks, dtype)
            # The encoding trial maps the file, as every other trial does: one copy per node.
            doc_vectors = mapped_vectors(vectors_file)
        else:
            doc_vectors = np.concatenate(list(chunks)).astype(dtype)
        encoded_tokens = sum(tokens)
    resolved = (index or IndexConfig()).resolve(
        passages=doc_vectors.shape[0], dimension=doc_vectors.shape[1]
    )
    index_path = (
        vectors_file.with_name(f"{vectors_file.stem}.{_index_name(resolved)}.faiss")
        if use_cache
        else None
    )
    search, index_hit = _searcher(doc_vectors, resolved, index_path)
    return DocumentIndex(
        corpus=corpus,
        doc_vectors=doc_vectors,
        index_config=resolved,
        build_seconds=time.perf_counter() - start,
        cache_hit=vectors_hit and index_hit,
        encoded_tokens=encoded_tokens,
        _search=search,
    )


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    # Trials running at once may build the same entry; a rename never leaves a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, suffix=f"{path.suffix}.tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as e:  # FAISS reports a failed write as a RuntimeError
        temporary.unlink(missing_ok=True)  # a partial file holds the space that ran out
        raise unwritable(path, e) from e


def _index_name(index: IndexConfig) -> str:
    """The cache name of a built index: its kind and build parameters (not the search-time
    nprobe and hnsw_ef_search, which reuse it)."""
    if index.kind == "hnsw":
        return f"hnsw-m{index.hnsw_links}"
    name = f"{index.kind}-nlist{index.nlist}"
    return f"{name}-m{index.pq_subquantizers}" if index.kind == "ivf_pq" else name


def _searcher(
    doc_vectors: np.ndarray, index: IndexConfig, path: Path | None
) -> tuple[_Search, bool]:
    """The search over ``doc_vectors`` that ``index`` describes, and whether it came from the
    cache at ``path`` (None: built in memory, not cached)."""
    if index.kind == "flat":
        return _exact_search(doc_vectors), True
    hit = path is not None and path.exists()
    if path is not None and hit:
        faiss_index = _read_mapped(path, index)
    else:
        built = _build_faiss_index(doc_vectors, index)
        faiss_index = built
        if path is not None:
            _write_atomically(path, lambda file: faiss.write_index(built, str(file)))
            faiss_index = _read_mapped(path, index)  # and the built copy goes, as the vectors'
    # Search-time settings: not part of the cached file, so changing them rebuilds nothing.
    if index.kind == "hnsw":
        faiss.ParameterSpace().set_index_parameter(
            faiss_index, "efSearch", _filled(index.hnsw_ef_search)
        )
    else:
        faiss.ParameterSpace().set_index_parameter(faiss_index, "nprobe", _filled(index.nprobe))
    return faiss_index.search, hit


_gpu_resources: list[faiss.StandardGpuResources] = []  # must outlive every GPU index made from it


def _exact_search(doc_vectors: np.ndarray) -> _Search:
    """Exact inner-product search; on the CPU straight over the memory map, without a copy."""
    if faiss.get_num_gpus() > 0:
        # A GPU copy of the vectors, as before memory maps: exact search is the default up to a
        # million passages (1.5 GB at 384 dimensions), which a GPU holds.
        if not _gpu_resources:
            _gpu_resources.append(faiss.StandardGpuResources())
        gpu_index = faiss.index_cpu_to_gpu(
            _gpu_resources[0], 0, faiss.IndexFlatIP(doc_vectors.shape[1])
        )
        for rows in _float32_batches(doc_vectors):
            gpu_index.add(rows)
        return gpu_index.search
    if doc_vectors.dtype != np.float32:
        return _exact_search_converting(doc_vectors)

    def search(question_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # faiss.knn runs knn_inner_product, the very routine IndexFlatIP.search runs (the same
        # positions and scores), on the caller's array: a C-contiguous float32 memory map is
        # passed as it is, where IndexFlatIP.add would copy every vector into the index.
        scores, positions = faiss.knn(
            question_vectors, doc_vectors, k, metric=faiss.METRIC_INNER_PRODUCT
        )
        return scores, positions

    return search


def _exact_search_converting(doc_vectors: np.ndarray) -> _Search:
    """Exact search over float16 vectors: FAISS searches each batch of rows as float32, and the
    batches' top k are merged (a batch converted at a time: never the whole matrix)."""

    def search(question_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found_scores, found_positions = [], []
        for start, rows in zip(
            range(0, doc_vectors.shape[0], _ADD_BATCH), _float32_batches(doc_vectors), strict=True
        ):
            scores, positions = faiss.knn(
                question_vectors, rows, min(k, rows.shape[0]), metric=faiss.METRIC_INNER_PRODUCT
            )
            found_scores.append(scores)
            found_positions.append(positions + start)
        scores, positions = np.hstack(found_scores), np.hstack(found_positions)
        # Highest score first, equal scores by position (whichever batch found them).
        order = np.lexsort((positions, -scores), axis=-1)[:, :k]
        return np.take_along_axis(scores, order, -1), np.take_along_axis(positions, order, -1)

    return search


def _float32_batches(doc_vectors: np.ndarray) -> Iterator[np.ndarray]:
    """The vectors ``_ADD_BATCH`` rows at a time, as C-contiguous float32 (a copy only where they
    are float16)."""
    for start in range(0, doc_vectors.shape[0], _ADD_BATCH):
        yield np.ascontiguousarray(doc_vectors[start : start + _ADD_BATCH], dtype=np.float32)


# Rows sampled to train IVF centroids: 64 a cell, above the 39 below which FAISS's k-means warns
# and under the 256 it would use at most (30M passages, nlist 21,876: 1.4M rows, 2.1 GB at 384
# dimensions); and at least 65,536 for ivf_pq's 256 centroids per sub-quantizer.
_TRAIN_ROWS_PER_CELL = 64
_MIN_TRAIN_ROWS = 65_536
# Rows added to an IVF index at a time: the quantizer's assignment of a batch is computed in RAM.
_ADD_BATCH = 65_536


def _build_faiss_index(doc_vectors: np.ndarray, index: IndexConfig) -> faiss.Index:
    dimension = doc_vectors.shape[1]
    if index.kind == "hnsw":
        graph = faiss.IndexHNSWFlat(
            dimension, _filled(index.hnsw_links), faiss.METRIC_INNER_PRODUCT
        )
        for rows in _float32_batches(doc_vectors):
            graph.add(rows)
        return graph
    nlist = _filled(index.nlist)
    quantizer = faiss.IndexFlatIP(dimension)
    ivf: faiss.Index
    if index.kind == "ivf_pq":
        ivf = faiss.IndexIVFPQ(
            quantizer,
            dimension,
            nlist,
            _filled(index.pq_subquantizers),
            8,  # bits a code: 256 centroids a sub-quantizer
            faiss.METRIC_INNER_PRODUCT,
        )
    else:
        ivf = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(_training_sample(doc_vectors, max(_TRAIN_ROWS_PER_CELL * nlist, _MIN_TRAIN_ROWS)))
    for rows in _float32_batches(doc_vectors):
        ivf.add(rows)
    return ivf


def _filled(parameter: int | None) -> int:
    # resolve() fills in every parameter of the kind it returns; None here is a bug, not input.
    assert parameter is not None
    return parameter


def _training_sample(doc_vectors: np.ndarray, size: int) -> np.ndarray:
    """At most ``size`` rows, the same ones in every build (seeded), read in file order."""
    if doc_vectors.shape[0] <= size:
        return np.ascontiguousarray(doc_vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(0).choice(doc_vectors.shape[0], size, replace=False))
    return np.ascontiguousarray(doc_vectors[rows], dtype=np.float32)


def _read_mapped(path: Path, index: IndexConfig) -> faiss.Index:
    # IO_FLAG_MMAP maps an IVF index's inverted lists (the vectors or codes) from the file;
    # IO_FLAG_MMAP_IFC maps an HNSW index's graph and stored vectors (FAISS 1.11 and later).
    flags = faiss.IO_FLAG_MMAP_IFC if index.kind == "hnsw" else faiss.IO_FLAG_MMAP
    try:
        return faiss.read_index(str(path), flags | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise DataError(
            f"cannot read the FAISS index {path}: {one_line(e)}; delete the file to rebuild it"
        ) from e
