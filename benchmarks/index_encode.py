"""Benchmark: encoding a corpus on Ray with 2 encoder workers against 1 (``ragsweep index``).

A synthetic corpus (JSONL, passages of about 60 words) is encoded by
``search.launch.encode.encode_on_cluster``, as ``ragsweep index`` and ``launch`` run it, on a local
Ray: once with one encoder actor, once with two (one CPU and one torch thread each), each into an
empty cache, so both encode everything. Printed for each: wall time (Ray Data and the actors'
start included), passages/s over the wall time, and passages/s after the first shard (the
actors' start excluded); then the ratio 2 workers / 1.
Run: .venv/bin/python benchmarks/index_encode.py [--passages 40000] [--shard 2000] [--embedder tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import load_average, setup_environment


def _corpus(path: Path, passages: int) -> None:
    words = "the river town council museum station history people north bridge old new".split()
    with path.open("w") as file:
        for row in range(passages):
            text = " ".join(words[(row * 7 + i * 3) % len(words)] for i in range(60))
            file.write(json.dumps({"id": f"p{row}", "title": f"Passage {row}", "text": text}))
            file.write("\n")


def _encode(
    corpus_file: Path, embedder_name: str, workers: int, shard: int
) -> tuple[float, float, int]:
    """(wall seconds, seconds after the first shard finished, passages) of one encode."""
    import ray
    import torch

    from search.launch._cluster import start_ray
    from search.launch.encode import EncodeProgress, encode_on_cluster
    from trainers.config import DataConfig, ModelsConfig
    from trainers.data import load_corpus
    from trainers.models import load_embedder

    data = DataConfig(source="jsonl", path=str(corpus_file), corpus_path=str(corpus_file))
    models = ModelsConfig(embedder=embedder_name, generator="tiny")
    with tempfile.TemporaryDirectory(prefix="ragsweep-encode-") as folder:
        cache_dir = Path(folder)
        corpus = load_corpus(data)
        embedder = load_embedder(embedder_name, cache_dir=cache_dir, device=torch.device("cpu"))
        reports: list[tuple[float, EncodeProgress]] = []
        start_ray(None, log_to_driver=False)
        started = time.perf_counter()
        encode_on_cluster(
            embedder,
            corpus,
            128,
            data=data,
            models=models,
            cache_dir=cache_dir,
            connect=lambda: None,
            workers=workers,
            shard_passages=shard,
            on_progress=lambda p: reports.append((time.perf_counter(), p)),
        )
        wall = time.perf_counter() - started
        ray.shutdown()
    first_at, first = next((at, p) for at, p in reports if p.encoded_passages)
    last_at, last = reports[-1]
    after_first = (last.encoded_passages - first.encoded_passages) / max(last_at - first_at, 1e-9)
    return wall, after_first, last.encoded_passages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=40_000)
    parser.add_argument("--shard", type=int, default=2_000)
    parser.add_argument("--embedder", default="tiny")
    options = parser.parse_args()
    setup_environment()
    with tempfile.TemporaryDirectory(prefix="ragsweep-corpus-") as folder:
        corpus_file = Path(folder) / "corpus.jsonl"
        _corpus(corpus_file, options.passages)
        rates = {}
        for workers in (1, 2):
            before = load_average()
            wall, after_first, passages = _encode(
                corpus_file, options.embedder, workers, options.shard
            )
            rates[workers] = (passages / wall, after_first)
            print(
                f"{workers} worker(s): {passages:,} passages ({options.embedder}, shards of "
                f"{options.shard:,}) in {wall:.1f} s = {passages / wall:,.0f} passages/s; "
                f"{after_first:,.0f} passages/s after the first shard; load {before} -> "
                f"{load_average()}"
            )
    print(
        f"2 workers / 1: {rates[2][0] / rates[1][0]:.2f}x over the wall time, "
        f"{rates[2][1] / rates[1][1]:.2f}x after the first shard"
    )


if __name__ == "__main__":
    main()
