"""A corpus' document vectors encoded on every worker of a Ray cluster (``ragsweep index``, and
``launch`` when a study's vectors are not cached yet).

Ray Data hands the corpus' shards (``trainers.encode``) to a pool of encoder actors: one per GPU
where the cluster has GPUs, else one per CPU. Each actor reads its rows from the memory-mapped
corpus and writes its shard into the cache, which every node must see (a shared filesystem on a
multi-node cluster). Finished shards survive a killed encode; the next one encodes only the rest.
A corpus of one shard is encoded by the process that needs it: a cluster has nothing to add.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainers import (
    DataConfig,
    DataError,
    ModelsConfig,
    RagsweepError,
    VectorDtype,
    causes,
    one_line,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from trainers import Corpus

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
    from trainers import SHARD_PASSAGES, assemble_shards, shard_job

    job = shard_job(
        embedder,
        corpus,
        cache_dir=cache_dir,
        max_length=max_length,
        dtype=dtype,
        shard_passages=shard_passages or SHARD_PASSAGES,
    )
    plan = job.plan
    if job.vectors_file.exists() or len(plan.ranges) <= 1:
        return None
    connect()
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = min(workers or gpus or int(ray.cluster_resources().get("CPU", 1)), len(plan.pending))
    started = time.perf_counter()
    progress = EncodeProgress(
        vectors_file=job.vectors_file,
        passages=len(corpus),
        shards=len(plan.ranges),
        resumed_shards=len(plan.finished),
        done_passages=sum(stop - start for start, stop in plan.finished),
        encoded_passages=0,
        workers=max(pool, 0),
        seconds=0.0,
    )
    report = on_progress or (lambda _: None)
    report(progress)
    if plan.pending:
        settings = {"job": job, "data": data, "models": models, "cache_dir": cache_dir}
        for passages in _encoded_shards(plan.pending, settings, pool, batch_size, gpus > 0):
            progress = _advanced(progress, passages, time.perf_counter() - started)
            report(progress)
    assemble_shards(job)
    return progress


def _advanced(progress: EncodeProgress, passages: int, seconds: float) -> EncodeProgress:
    return dataclasses.replace(
        progress,
        done_passages=progress.done_passages + passages,
        encoded_passages=progress.encoded_passages + passages,
        seconds=seconds,
    )


def _encoded_shards(
    pending: list[tuple[int, int]],
    settings: dict[str, Any],
    pool: int,
    batch_size: int,
    use_gpus: bool,
) -> Iterator[int]:
    """The passages of each shard as the pool finishes it (in any order)."""
    import ray.data

    from trainers import ShardEncoder

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows its own
    # Ray Data logs each run's plan, and that its bars are off; the caller reports the encode.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    shards = ray.data.from_items(
        [{"start": start, "stop": stop} for start, stop in pending],
        override_num_blocks=len(pending),  # a block a shard: every actor gets work at once
    )

    class RayShardEncoder:
        """A Ray Data actor around the Ray-free ShardEncoder. The settings travel with the class
        (pickled by value), not as constructor arguments, which Ray keeps in its object store."""

        def __init__(self) -> None:
            import torch

            # One CPU a worker, as Ray reserved: torch's default (every core) would oversubscribe
            # the node the other workers share.
            torch.set_num_threads(1)
            self._encode = ShardEncoder(**settings, batch_size=batch_size)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            for start, stop in zip(batch["start"], batch["stop"], strict=True):
                self._encode((int(start), int(stop)))
            return {"start": batch["start"], "stop": batch["stop"]}

    encoded = shards.map_batches(
        RayShardEncoder,
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
    """The error a worker raised (ours, with its fix), else Ray's, with the way to resume."""
    for cause in causes(error):
        if isinstance(cause, RagsweepError):
            return type(cause)(str(cause))
    return DataError(
        f"encoding the corpus on Ray failed ({one_line(error)}); the shards already encoded are "
        "kept: run it again to finish the rest"
    )
