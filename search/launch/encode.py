"""A corpus' document vectors encoded on every worker of a Ray cluster (``ragsweep index``, and
``launch`` when a study's vectors are not cached yet).

Ray Data hands the corpus' shards (``trainers.encode``) to a pool of encoder actors: one per GPU
where the cluster has GPUs, else one per CPU. Each actor reads its rows from the memory-mapped
corpus and writes its shard into the cache, which every node must see (a shared filesystem on a
multi-node cluster). Finished shards survive a killed encode; the next one encodes only the rest.
A corpus of one shard is encoded by the process that needs it: a cluster has nothing to add.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainers.config import DataConfig, ModelsConfig, VectorDtype
from trainers.errors import DataError, RagsweepError, causes, one_line

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from trainers.corpus import Corpus

__all__ = ["EncodeProgress", "encode_on_cluster"]


@dataclass(frozen=True)
class EncodeProgress:
    """Where an encode stands: reported when it starts and after every shard."""

    vectors_file: Path
    passages: int  # in the corpus
    shards: int
    resumed_shards: int  # found finished on disk when this encode started
    done_passages: int  # encoded so far, resumed shards included
    encoded_passages: int  # encoded by this run
    workers: int
    seconds: float  # since this run started

    @property
    def passages_per_s(self) -> float:
        return self.encoded_passages / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_left(self) -> float | None:
        rate = self.passages_per_s
        return (self.passages - self.done_passages) / rate if rate > 0 else None


def encode_on_cluster(
    embedder: SentenceTransformer,
    corpus: Corpus,
    max_length: int,
    *,
    data: DataConfig,
    models: ModelsConfig,
    cache_dir: Path,
    connect: Callable[[], None],
    dtype: VectorDtype = "float32",
    workers: int | None = None,
    shard_passages: int | None = None,
    batch_size: int = 64,
    on_progress: Callable[[EncodeProgress], None] | None = None,
) -> EncodeProgress | None:
    """Encode ``corpus`` into its vectors file on the Ray cluster ``connect`` joins, shard by shard,
    unless the file is cached or the corpus is a single shard (None: nothing was done here).

    ``workers`` None: one per GPU of the cluster, else one per CPU; ``dtype``: how the vectors
    are stored (training.index.vector_dtype).
    """
    from trainers.encode import SHARD_PASSAGES, assemble_shards, shard_plan, vectors_path

    vectors_file = vectors_path(cache_dir, embedder, corpus, max_length, dtype)
    shard_passages = shard_passages or SHARD_PASSAGES
    plan = shard_plan(vectors_file, len(corpus), shard_passages)
    if vectors_file.exists() or len(plan.ranges) <= 1:
        return None
    connect()
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = min(workers or gpus or int(ray.cluster_resources().get("CPU", 1)), len(plan.pending))
    started = time.perf_counter()
    resumed = sum(stop - start for start, stop in plan.finished)
    progress = EncodeProgress(
        vectors_file=vectors_file,
        passages=len(corpus),
        shards=len(plan.ranges),
        resumed_shards=len(plan.finished),
        done_passages=resumed,
        encoded_passages=0,
        workers=max(pool, 0),
        seconds=0.0,
    )
    report = on_progress or (lambda _: None)
    report(progress)
    if plan.pending:
        from trainers.models import weights_fingerprint

        constructor = {
            "data": data,
            "models": models,
            "cache_dir": str(cache_dir),
            "folder": str(plan.folder),
            "max_length": max_length,
            "batch_size": batch_size,
            "dtype": dtype,
            "corpus_fingerprint": corpus.fingerprint,
            "weights": weights_fingerprint(embedder),
        }
        for encoded in _encoded_shards(plan.pending, constructor, pool, use_gpus=gpus > 0):
            progress = _advanced(progress, encoded, time.perf_counter() - started)
            report(progress)
    assemble_shards(shard_plan(vectors_file, len(corpus), shard_passages), vectors_file)
    return progress


def _advanced(progress: EncodeProgress, passages: int, seconds: float) -> EncodeProgress:
    return EncodeProgress(
        **{
            **progress.__dict__,
            "done_passages": progress.done_passages + passages,
            "encoded_passages": progress.encoded_passages + passages,
            "seconds": seconds,
        }
    )


def _encoded_shards(
    pending: list[tuple[int, int]], constructor: dict[str, Any], pool: int, *, use_gpus: bool
) -> Any:
    """The passages of each shard as the pool finishes it (in any order)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows its own
    # Ray Data logs each run's plan, and that its bars are off; the caller reports the encode.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    shards = ray.data.from_items(
        [{"start": start, "stop": stop} for start, stop in pending],
        override_num_blocks=len(pending),  # a block a shard: every actor gets work at once
    )

    class ShardEncoder(_ShardEncoder):
        # The settings travel with the class (pickled by value), not as constructor arguments,
        # which Ray keeps in its object store and could not give back to a restarted actor.
        def __init__(self) -> None:
            super().__init__(**constructor)

    encoded = shards.map_batches(
        ShardEncoder,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_gpus=1 if use_gpus else 0,
        num_cpus=1,
    )
    try:
        for row in encoded.iter_rows():
            yield int(row["stop"]) - int(row["start"])
    except Exception as e:
        raise _encode_error(e) from e


def _encode_error(error: Exception) -> RagsweepError:
    """The error an actor raised (ours, with its fix), else Ray's, with the way to resume."""
    for cause in causes(error):
        if isinstance(cause, RagsweepError):
            return type(cause)(str(cause))
    return DataError(
        f"encoding the corpus on Ray failed ({one_line(error)}); the shards already encoded are "
        "kept: run it again to finish the rest"
    )


class _ShardEncoder:
    """A Ray Data actor: the embedder loaded once, then one shard encoded per call."""

    def __init__(
        self,
        *,
        data: DataConfig,
        models: ModelsConfig,
        cache_dir: str,
        folder: str,
        max_length: int,
        batch_size: int,
        dtype: VectorDtype,
        corpus_fingerprint: str,
        weights: str,
    ) -> None:
        import torch

        from trainers.data import load_corpus
        from trainers.models import load_embedder, weights_fingerprint

        # One CPU a worker, as Ray reserved: torch's default (every core) would oversubscribe the
        # node the other workers share.
        torch.set_num_threads(1)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._corpus = load_corpus(data)
        if self._corpus.fingerprint != corpus_fingerprint:
            raise DataError(
                f"{self._corpus.where} differs on this Ray node from the driver's copy; give every "
                "node the same corpus files"
            )
        self._embedder = load_embedder(models.embedder, cache_dir=Path(cache_dir), device=device)
        if weights_fingerprint(self._embedder) != weights:
            raise DataError(
                f"the embedder '{models.embedder}' differs on this Ray node from the driver's; give "
                "every node the same model files"
            )
        self._folder, self._max_length, self._batch_size = Path(folder), max_length, batch_size
        self._dtype = dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from trainers.encode import encode_shard

        for start, stop in zip(batch["start"], batch["stop"], strict=True):
            encode_shard(
                self._embedder,
                self._corpus,
                (int(start), int(stop)),
                folder=self._folder,
                max_length=self._max_length,
                batch_size=self._batch_size,
                dtype=self._dtype,
            )
        return {"start": batch["start"], "stop": batch["stop"]}
