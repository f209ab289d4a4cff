"""The frozen document index: passage vectors computed once, cached on disk, searched with FAISS.

Only question vectors change when the embedder trains (the index is never re-encoded, as in the
paper), so the vectors depend on (embedder weights, corpus, max length) alone; that triple is the
cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from trainers.data import Document
from trainers.errors import DataError, one_line
from trainers.models import weights_fingerprint

__all__ = ["DocumentIndex", "build_index", "passage_text"]


@dataclass
class DocumentIndex:
    """Unit-norm document vectors and an exact inner-product FAISS index over them."""

    documents: tuple[Document, ...]
    doc_vectors: np.ndarray  # (N, D) float32
    build_seconds: float  # time to encode the corpus (or to read the cache)
    cache_hit: bool
    encoded_tokens: int  # passage tokens encoded; 0 on a cache hit
    _faiss_index: faiss.Index
    _positions: dict[str, int] = field(init=False)
    _device_vectors: dict[torch.device, torch.Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._positions = {document.id: row for row, document in enumerate(self.documents)}

    def search(self, question_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, document positions) for each question vector: ((Q, k), (Q, k))."""
        scores, positions = self._faiss_index.search(
            np.ascontiguousarray(question_vectors, dtype=np.float32), k
        )
        return scores, positions

    def position(self, doc_id: str) -> int:
        """The row of document ``doc_id`` in the index."""
        return self._positions[doc_id]

    def vectors(self, device: torch.device) -> torch.Tensor:
        """The document vectors as a frozen tensor (N, D), for scores that carry a gradient to E.

        Kept per device: every training step gathers from it, and a GPU copy per step would move
        the whole matrix each time.
        """
        if device not in self._device_vectors:
            self._device_vectors[device] = torch.from_numpy(self.doc_vectors).to(device)
        return self._device_vectors[device]


def passage_text(document: Document) -> str:
    """What the embedder reads for a document: title and text, as sentence-transformers expects."""
    return f"{document.title}: {document.text}"


def build_index(
    embedder: SentenceTransformer,
    documents: Sequence[Document],
    *,
    cache_dir: Path,
    max_length: int,
    batch_size: int = 64,
    use_cache: bool = True,
) -> DocumentIndex:
    """Encode the corpus with the (frozen) embedder, or load the vectors cached for the same key.

    ``use_cache=False`` encodes the corpus and neither reads nor writes the cache.
    """
    start = time.perf_counter()
    cache_path = cache_dir / "index" / f"{_cache_key(embedder, documents, max_length)}.npy"
    cache_hit = use_cache and cache_path.exists()
    encoded_tokens = 0
    if cache_hit:
        doc_vectors = np.load(cache_path, allow_pickle=False)
    else:
        doc_vectors, encoded_tokens = _encode(embedder, documents, max_length, batch_size)
        if use_cache:
            _save_atomically(cache_path, doc_vectors)
    return DocumentIndex(
        documents=tuple(documents),
        doc_vectors=doc_vectors,
        build_seconds=time.perf_counter() - start,
        cache_hit=cache_hit,
        encoded_tokens=encoded_tokens,
        _faiss_index=_faiss_index(doc_vectors),
    )


def _cache_key(
    embedder: SentenceTransformer, documents: Sequence[Document], max_length: int
) -> str:
    corpus_hash = hashlib.sha256()
    for document in documents:
        corpus_hash.update(json.dumps([document.id, document.title, document.text]).encode())
    key = {
        "weights": weights_fingerprint(embedder),
        "corpus": corpus_hash.hexdigest(),
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _encode(
    embedder: SentenceTransformer, documents: Sequence[Document], max_length: int, batch_size: int
) -> tuple[np.ndarray, int]:
    texts = [passage_text(document) for document in documents]
    previous_length = embedder.max_seq_length
    embedder.max_seq_length = max_length
    try:
        doc_vectors = embedder.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        encoded_tokens = sum(
            min(len(ids), max_length) for ids in embedder.tokenizer(texts).input_ids
        )
    finally:
        embedder.max_seq_length = previous_length
    return doc_vectors.astype(np.float32), encoded_tokens


def _save_atomically(path: Path, doc_vectors: np.ndarray) -> None:
    # Trials running at once may build the same index; a rename never leaves a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, doc_vectors, allow_pickle=False)
        os.replace(temporary, path)
    except OSError as e:
        Path(temporary).unlink(missing_ok=True)  # a partial file holds the space that ran out
        raise DataError(
            f"cannot write the index cache {path.parent}: {one_line(e)}; free space there or "
            "point RAGSWEEP_CACHE at a larger disk"
        ) from e


_gpu_resources: list[faiss.StandardGpuResources] = []  # must outlive every GPU index made from it


def _faiss_index(doc_vectors: np.ndarray) -> faiss.Index:
    index: faiss.Index = faiss.IndexFlatIP(doc_vectors.shape[1])
    if faiss.get_num_gpus() > 0:
        if not _gpu_resources:
            _gpu_resources.append(faiss.StandardGpuResources())
        index = faiss.index_cpu_to_gpu(_gpu_resources[0], 0, index)
    index.add(doc_vectors)
    return index
