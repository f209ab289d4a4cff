"""The corpus encoded into the vectors file the index reads: in one process, or in shards that any
number of workers encode at once (``search.encode`` runs them on Ray).

The vectors depend on (embedder weights, corpus, max length) alone; that triple (and the dtype
they are stored in, where it is float16) names the file.
A shard is a range of corpus rows written atomically to its own file, so a killed encode resumes
from the shards it finished; the shards are then streamed, in order, into the one vectors file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from trainers.config import DataConfig, ModelsConfig, VectorDtype
from trainers.corpus import Corpus, Document
from trainers.errors import DataError, one_line
from trainers.models import weights_fingerprint

__all__ = [
    "SHARD_PASSAGES",
    "EncodedShard",
    "ShardEncoder",
    "ShardJob",
    "ShardPlan",
    "assemble_shards",
    "encode_corpus",
    "encode_shard",
    "mapped_vectors",
    "passage_text",
    "shard_job",
    "shard_plan",
    "unwritable",
    "vectors_path",
    "write_vectors",
]

# Passages per call of SentenceTransformer.encode. It sorts each call's passages by length before
# batching them, so the batches, and the last bits of a vector, depend on the call: a corpus of
# one call is encoded exactly as it always was. A shard is one call, too.
_ENCODE_CHUNK = 65_536
SHARD_PASSAGES = _ENCODE_CHUNK


def passage_text(document: Document) -> str:
    """What the embedder reads for a document: title and text, as sentence-transformers expects."""
    return f"{document.title}: {document.text}"


def vectors_path(
    cache_dir: Path,
    embedder: SentenceTransformer,
    corpus: Corpus,
    max_length: int,
    dtype: VectorDtype = "float32",
) -> Path:
    """The cache file of the corpus' vectors under this embedder and max length, in ``dtype``."""
    return _vectors_file(
        cache_dir, weights_fingerprint(embedder), corpus.fingerprint, max_length, dtype
    )


def _vectors_file(
    cache_dir: Path, weights: str, corpus_fingerprint: str, max_length: int, dtype: VectorDtype
) -> Path:
    key: dict[str, object] = {
        "weights": weights,
        "corpus": corpus_fingerprint,
        "max_length": max_length,
    }
    if dtype != "float32":  # float32 files keep the names they always had
        key["dtype"] = dtype
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir / "index" / f"{digest}.npy"


def encode_corpus(
    embedder: SentenceTransformer,
    corpus: Corpus,
    *,
    max_length: int,
    batch_size: int,
    tokens: list[int],
    start: int = 0,
    stop: int | None = None,
) -> Iterator[np.ndarray]:
    """Unit-norm float32 vectors (n, D) of rows ``start`` to ``stop`` (default: all), chunk after
    chunk in corpus order; the passage tokens of each chunk are appended to ``tokens``."""
    previous_length = embedder.max_seq_length
    embedder.max_seq_length = max_length
    try:
        for documents in corpus.batches(_ENCODE_CHUNK, start=start, stop=stop):
            texts = [passage_text(document) for document in documents]
            doc_vectors = embedder.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            tokens.append(
                sum(min(len(ids), max_length) for ids in embedder.tokenizer(texts).input_ids)
            )
            yield np.ascontiguousarray(doc_vectors, dtype=np.float32)
    finally:
        embedder.max_seq_length = previous_length


@dataclass(frozen=True)
class ShardPlan:
    """The shards of one vectors file: their folder and row ranges, and which are finished."""

    folder: Path  # <vectors file>.shards-<passages a shard>/, beside the vectors file
    ranges: tuple[tuple[int, int], ...]  # (start, stop) rows of every shard, in corpus order
    finished: tuple[tuple[int, int], ...]  # those whose file is complete (a resumed encode)

    @property
    def pending(self) -> list[tuple[int, int]]:
        done = set(self.finished)
        return [shard for shard in self.ranges if shard not in done]


def shard_plan(vectors_file: Path, passages: int, shard_passages: int) -> ShardPlan:
    """The shards of ``passages`` rows, ``shard_passages`` each, and those already on disk."""
    folder = vectors_file.with_name(f"{vectors_file.stem}.shards-{shard_passages}")
    ranges = tuple(
        (start, min(start + shard_passages, passages))
        for start in range(0, passages, shard_passages)
    )
    finished = tuple(
        shard for shard in ranges if _complete(_shard_file(folder, shard), shard[1] - shard[0])
    )
    return ShardPlan(folder=folder, ranges=ranges, finished=finished)


@dataclass(frozen=True)
class EncodedShard:
    """What encoding one shard did: its rows, passage tokens and seconds."""

    start: int
    stop: int
    tokens: int
    seconds: float


def encode_shard(
    embedder: SentenceTransformer,
    corpus: Corpus,
    shard: tuple[int, int],
    *,
    folder: Path,
    max_length: int,
    batch_size: int,
    dtype: VectorDtype = "float32",
) -> EncodedShard:
    """Encode rows ``shard`` = (start, stop) into their own file in ``folder``, atomically: a
    worker killed mid-shard leaves no file, and the shard is encoded again."""
    began = time.perf_counter()
    start, stop = shard
    tokens: list[int] = []
    chunks = encode_corpus(
        embedder,
        corpus,
        max_length=max_length,
        batch_size=batch_size,
        tokens=tokens,
        start=start,
        stop=stop,
    )
    write_vectors(_shard_file(folder, shard), stop - start, chunks, dtype)
    return EncodedShard(start, stop, sum(tokens), time.perf_counter() - began)


def assemble_shards(job: ShardJob) -> None:
    """Stream every shard of ``job``, in order, into its vectors file (atomically), then delete
    the shards. The shards on disk now are what counts, whoever wrote them: one missing is named."""
    passages = job.plan.ranges[-1][1] if job.plan.ranges else 0
    plan = shard_plan(job.vectors_file, passages, job.shard_passages)
    unfinished = plan.pending
    if unfinished:
        raise DataError(
            f"{len(unfinished)} of {len(plan.ranges)} shards of {job.vectors_file.name} are not "
            "encoded yet; run the encode again to finish them"
        )
    shards = (mapped_vectors(_shard_file(plan.folder, shard)) for shard in plan.ranges)
    write_vectors(job.vectors_file, passages, (np.asarray(rows) for rows in shards), job.dtype)
    shutil.rmtree(plan.folder, ignore_errors=True)


@dataclass(frozen=True)
class ShardJob:
    """What every worker of a sharded encode needs, from the process that plans it: where the
    vectors go, the shards, and the fingerprints its corpus and embedder must match."""

    vectors_file: Path
    plan: ShardPlan
    shard_passages: int
    max_length: int
    dtype: VectorDtype
    corpus_fingerprint: str
    weights: str  # the embedder's weights_fingerprint


def shard_job(
    embedder: SentenceTransformer,
    corpus: Corpus,
    *,
    cache_dir: Path,
    max_length: int,
    dtype: VectorDtype = "float32",
    shard_passages: int = SHARD_PASSAGES,
) -> ShardJob:
    """The sharded encode of ``corpus`` into its vectors file, and which shards are done."""
    weights = weights_fingerprint(embedder)  # hashed once: it names the file and checks workers
    vectors_file = _vectors_file(cache_dir, weights, corpus.fingerprint, max_length, dtype)
    return ShardJob(
        vectors_file=vectors_file,
        plan=shard_plan(vectors_file, len(corpus), shard_passages),
        shard_passages=shard_passages,
        max_length=max_length,
        dtype=dtype,
        corpus_fingerprint=corpus.fingerprint,
        weights=weights,
    )


class ShardEncoder:
    """A worker of a sharded encode: the corpus and embedder loaded once (checked against the
    job's fingerprints: a node with other files must not write into the shared cache), then a
    shard encoded per call."""

    def __init__(
        self,
        job: ShardJob,
        *,
        data: DataConfig,
        models: ModelsConfig,
        cache_dir: Path,
        batch_size: int = 64,
    ) -> None:
        import torch

        from trainers.data import load_corpus
        from trainers.models import load_embedder

        self._job, self._batch_size = job, batch_size
        self._corpus = load_corpus(data)
        if self._corpus.fingerprint != job.corpus_fingerprint:
            raise DataError(
                f"{self._corpus.where} differs on this node from the one the encode was planned "
                "with; give every node the same corpus files"
            )
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._embedder = load_embedder(models.embedder, cache_dir=cache_dir, device=device)
        if weights_fingerprint(self._embedder) != job.weights:
            raise DataError(
                f"the embedder '{models.embedder}' differs on this node from the one the encode "
                "was planned with; give every node the same model files"
            )

    def __call__(self, shard: tuple[int, int]) -> EncodedShard:
        return encode_shard(
            self._embedder,
            self._corpus,
            shard,
            folder=self._job.plan.folder,
            max_length=self._job.max_length,
            batch_size=self._batch_size,
            dtype=self._job.dtype,
        )


def mapped_vectors(path: Path) -> np.ndarray:
    """The vectors file at ``path`` as a read-only memory map: trials share its pages, and none
    may write into another's vectors."""
    try:
        doc_vectors: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        raise DataError(
            f"cannot read the document vectors {path}: {one_line(e)}; delete the file to rebuild it"
        ) from e
    return doc_vectors


def write_vectors(
    path: Path, rows: int, chunks: Iterable[np.ndarray], dtype: VectorDtype = "float32"
) -> None:
    """Write the vectors ``chunks`` hold, ``rows`` of them in order, as one .npy file of
    ``dtype`` at ``path``: whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, suffix=f"{path.suffix}.tmp")
    temporary = Path(name)
    written = 0
    try:
        # Through write(), not a memory map: a full disk is then an OSError, not a SIGBUS. Encoding
        # fails with other errors (torch's RuntimeError), which pass as they are.
        with os.fdopen(handle, "wb") as file:
            for doc_vectors in chunks:
                if written == 0:
                    header = {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                        "fortran_order": False,
                        "shape": (rows, doc_vectors.shape[1]),
                    }
                    np.lib.format.write_array_header_1_0(file, header)
                file.write(np.ascontiguousarray(doc_vectors, dtype=dtype).data)
                written += doc_vectors.shape[0]
        if written != rows:  # the corpus changed while it was read: keep nothing
            raise DataError(
                f"the corpus gave {written} passages where it has {rows}; rerun to encode it again"
            )
        os.replace(temporary, path)
    except OSError as e:
        raise unwritable(path, e) from e
    finally:
        temporary.unlink(missing_ok=True)  # a partial file holds the space that ran out


def unwritable(path: Path, error: BaseException) -> DataError:
    """The error for a cache file that cannot be written, with the fix."""
    return DataError(
        f"cannot write the index cache {path.parent}: {one_line(error)}; free space there or "
        "point RAGSWEEP_CACHE at a larger disk"
    )


def _shard_file(folder: Path, shard: tuple[int, int]) -> Path:
    return folder / f"{shard[0]:012d}-{shard[1]:012d}.npy"


def _complete(path: Path, rows: int) -> bool:
    """Whether the shard file at ``path`` holds its ``rows`` vectors (its header says so and the
    file is as long as the header says: it was renamed into place whole)."""
    if not path.exists():
        return False
    try:
        shard_vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return bool(shard_vectors.ndim == 2 and shard_vectors.shape[0] == rows)
