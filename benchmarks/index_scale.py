"""Benchmark: the frozen index at scale: a trial's own memory, two trials sharing one index, and
approximate search against exact, on synthetic corpora of 10k to 3M passages.

Per corpus size a Parquet corpus is written (ids, titles "Article a", ~500-character texts: a
sentence naming the passage and a slice of a fixed paragraph) and its vectors are written straight
into the index cache, at the path `build_index` looks under for MiniLM, the embedder the trials
load (`trainers.encode.vectors_path`): the corpus is never encoded (3M passages would take days on
a CPU), so what is measured is what a trial holds once the vectors exist. The vectors have
MiniLM's 384 dimensions, unit norm, and structure as passage embeddings have, at the same density
at every size: a passage is the sum of one random direction for each nested group of rows it is in
(16 rows, an article's passages, kept next to each other as corpora keep them; then 128, 1,024,
8,192 and 65,536 rows) and one of its own, so that it shares 55% of its variance with its
article's passages, 40% with its group of 128 and so on down to 10%. Uniform noise would leave no
neighbours for an approximate index to find, tight clusters would make them trivial; this gives a
smooth spectrum of near ties below each question's passage (the exact scores at ranks 1, 5, 6 and
100 are printed). Agreement depends on that structure: it checks the index on data shaped like
embeddings, and is not a figure for any real corpus.

Measured per size, each in fresh processes:
1. memory: two trials at once, each loading MiniLM, the corpus (the `datasets` Arrow files and the
   corpus manifest, memory-mapped) and `build_index` from the warm cache, then searching 8 batches
   of 32 question vectors at k=5 and reading the hits' `rows()` and `documents()`; the parent
   measures both (psutil) while both are alive. USS beyond models: a trial's USS less that of a
   process that loads MiniLM and imports the same libraries but reads no corpus or index (two of
   those, measured the same way). The two trials search the same questions, so the pages they read
   from the cached files are shared and out of their USS; pages of those files only one process
   maps would count in its USS though any other trial would share them, so they are also given
   apart ("in files"). PSS of 2 trials: the two trials' PSS in the cached files (vectors, FAISS
   index, Arrow corpus, manifest), and that over the pages one trial maps in them: 1.00 copies is
   one index per node, whatever the number of trials.
2. before memory maps: what a trial held before the index was memory-mapped (the whole vectors in
   RAM, an `IndexFlatIP` copy of them, every passage as a `Document` and a dict from id to row),
   emulated in a process beside a baseline one, less the baseline's USS. Where that would not fit
   in 60% of the memory available it is estimated (2 x the vectors file + per passage what the
   largest measured size held per passage), and marked "est.".
3. agreement and speed: 1,024 question vectors, each at cosine 0.8 to a random passage (not one of
   the corpus' vectors), searched by the default index (`training.index.kind: auto`: exact up to
   1M passages, ivf_flat above) and by each kind of --also-kinds (default ivf_flat), against exact
   search (`faiss.knn` over the memory map). Top-5 agreement: mean |top 5 found & exact top 5| / 5. Milliseconds per batch of 32
   questions on one FAISS thread (a trial's one CPU): the median over 32 batches, exact search's
   over 8, after one untimed batch.

Printed last: a table (a row per size and kind; memory for every kind, the pre-memory-map figure on
the default's row) and the figures the acceptance reads: USS growth from the smallest to the
largest size (target under 200 MB) beside the pre-memory-map growth, the copies two trials hold,
and the default index's agreement at the largest size (target at least 0.95).

Run on an idle machine: .venv/bin/python benchmarks/index_scale.py
  [--sizes 10000,100000,1000000,3000000] [--also-kinds ivf_flat,hnsw] [--workdir DIR] [--keep]
Without --workdir everything is written to a folder under /tmp, removed at the end unless --keep;
a --workdir is kept, and a rerun reuses the corpora, vectors and indexes it holds. The 3M corpus
takes ~11 GB there (vectors 4.6 GB, ivf_flat index 4.7 GB, Parquet and Arrow corpus; 1M ~3.7 GB);
its pre-memory-map emulation would hold ~13 GB, so a 24 GiB machine estimates it. Building the
3M ivf_flat index is the largest part of the run (FAISS on every core); an hnsw build at 1M and
above takes far longer on a few cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from _common import load_average, setup_environment

_DEFAULT_SIZES = "10000,100000,1000000,3000000"
_K = 5
_BATCH = 32
_TRIAL_BATCHES = 8  # batches each memory trial searches
_QUESTIONS = 1024  # 32 batches: agreement and timing
_SPECTRUM = (1, 5, 6, 100)  # ranks whose mean exact score is printed
_EXACT_TIMED_BATCHES = 8  # exact search at 3M takes seconds a batch on one thread
_CHUNK = 65_536  # rows generated and written at a time: 96 MiB of vectors at 384 dimensions
# The vectors' structure: a passage is the sum of one random direction per nested group of rows
# it belongs to (16 rows: an article's passages, which corpora keep next to each other; then 128,
# 1,024, 8,192 and 65,536 rows) and its own, each carrying a share of its variance. Two passages of
# one article then share 55% of it (cosine ~0.55), of one group of 128 40%, down to 10%: a smooth
# spectrum of neighbours, at the same density at every corpus size.
_GROUPS = ((16, 0.15), (128, 0.10), (1024, 0.10), (8192, 0.10), (65_536, 0.10))  # (rows, share)
_OWN_SHARE = 1 - sum(share for _, share in _GROUPS)
_COS_QUESTION = 0.8  # a question's cosine to the passage it is drawn near
_SEED = 0
_FILLER = (
    "The river town of Aldermere sits where two valleys meet. Its first bridge was built from oak "
    "and stone, and the second, longer one when the railway reached the town. Farmers bring "
    "wheat, apples, honey and wool to the market square every Saturday morning, and the old clock "
    "above the town hall has struck the hours for more than three hundred years. Children learn "
    "to count on its face before they can read, and visitors ask who painted the numbers gold. "
    "The library was founded by a printer's widow, the museum opened in a former grain store, and "
    "the northern province sends its wool south along the same road the drovers used. "
) * 2
_TEXT_CHARS = 450  # of filler per passage, after the sentence naming it
# Pre-memory-map emulation, before any size is measured: the bytes of a passage's Document
# (object, dict, three strings) and its dict entry, for a passage of ~500 characters.
_GUESSED_DOCUMENT_BYTES = 1000
_LEGACY_MEMORY_SHARE = 0.6  # emulate only what fits in this share of the available memory
_MB, _GB = 1e6, 1e9


# --- the synthetic corpus ----------------------------------------------------------------------


def _noise_scale(cosine: float, dimension: int) -> float:
    """Per-coordinate Gaussian noise that leaves a unit vector at ``cosine`` to where it was."""
    return float(np.sqrt((1 / cosine**2 - 1) / dimension))


def _unit(vectors: np.ndarray) -> np.ndarray:
    unit: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit.astype(np.float32)


def _chunks(size: int) -> Iterator[tuple[int, int, int]]:
    """(chunk number, first row, rows) covering ``size`` rows."""
    for number, start in enumerate(range(0, size, _CHUNK)):
        yield number, start, min(_CHUNK, size - start)


def _passage_vectors(size: int, dimension: int) -> Iterator[np.ndarray]:
    """The corpus' unit vectors (rows, D), chunk after chunk in row order; a row's vector is the
    same in every corpus size."""
    for number, start, rows in _chunks(size):
        rng = np.random.default_rng([_SEED, 0, number])
        summed = np.sqrt(_OWN_SHARE) * rng.standard_normal((rows, dimension), dtype=np.float32)
        for level, (group, share) in enumerate(_GROUPS, start=1):
            # Group sizes divide the chunk size or are multiples of it, so a chunk holds whole
            # groups or lies in one: each group's direction is drawn from a seed of its own.
            first = start // group
            members = np.arange(start, start + rows) // group - first
            directions = np.random.default_rng([_SEED, level, first]).standard_normal(
                (int(members[-1]) + 1, dimension), dtype=np.float32
            )
            summed += np.sqrt(share) * directions[members]
        yield _unit(summed)


def _write_corpus(path: Path, size: int) -> None:
    import pyarrow
    import pyarrow.parquet

    schema = pyarrow.schema([(name, pyarrow.string()) for name in ("id", "title", "text")])
    article = _GROUPS[0][0]
    partial = path.with_suffix(".tmp")
    with pyarrow.parquet.ParquetWriter(partial, schema) as writer:
        for _, start, rows in _chunks(size):
            numbers = range(start, start + rows)
            columns = {
                "id": [f"p{row}" for row in numbers],
                "title": [f"Article {row // article}" for row in numbers],
                "text": [
                    f"Passage {row % article + 1} of article {row // article}. "
                    + _FILLER[row % 300 : row % 300 + _TEXT_CHARS]
                    for row in numbers
                ],
            }
            writer.write_table(pyarrow.table(columns, schema=schema))
    partial.replace(path)


def _questions(doc_vectors: np.ndarray, dimension: int) -> np.ndarray:
    """(_QUESTIONS, D) unit vectors, each at cosine ~0.8 to a random passage: held out, not rows."""
    rng = np.random.default_rng([_SEED, 3])
    rows = np.sort(rng.choice(doc_vectors.shape[0], _QUESTIONS, replace=False))
    noise = rng.standard_normal((_QUESTIONS, dimension), dtype=np.float32)
    return _unit(np.asarray(doc_vectors[rows]) + _noise_scale(_COS_QUESTION, dimension) * noise)


# --- child processes -----------------------------------------------------------------------------


def _folder(job: dict[str, Any]) -> Path:
    return Path(job["workdir"]) / f"{job['size']}"


def _load(job: dict[str, Any]) -> tuple[Any, Any]:
    """(MiniLM, the corpus of the job's size, or None for a baseline job)."""
    import torch

    from trainers.models import load_embedder

    embedder = load_embedder("minilm", cache_dir=Path(job["workdir"]), device=torch.device("cpu"))
    if "size" not in job:
        return embedder, None
    return embedder, _corpus(_folder(job) / "corpus.parquet")


def _corpus(path: Path) -> Any:
    """The corpus file read as `data.corpus_path` is: datasets' memory-mapped Arrow files."""
    import datasets

    from trainers.config import CorpusColumns
    from trainers.corpus import Corpus

    rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    return Corpus.from_dataset(
        rows, columns=CorpusColumns(), where=f"corpus '{path}'", source_files=[path]
    )


def _max_length() -> int:
    from trainers.config import TrainingConfig

    return TrainingConfig().embedder_max_length


def _build(embedder: Any, corpus: Any, job: dict[str, Any], config: dict[str, Any]) -> Any:
    from trainers.config import IndexConfig
    from trainers.index import build_index

    return build_index(
        embedder,
        corpus,
        cache_dir=Path(job["workdir"]) / "cache",
        max_length=_max_length(),
        index=IndexConfig.model_validate(config),
    )


def _prepare_child(job: dict[str, Any]) -> dict[str, Any]:
    """Write the corpus, its vectors and questions, and build each index of the job: untimed work
    the measurements then read from the cache."""
    from trainers.config import IndexConfig
    from trainers.encode import vectors_path, write_vectors

    folder, size = _folder(job), job["size"]
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    corpus_file = folder / "corpus.parquet"
    if not corpus_file.exists():
        _write_corpus(corpus_file, size)
    embedder, corpus = _load(job)
    corpus_s = time.perf_counter() - start
    dimension = embedder.get_sentence_embedding_dimension()
    # Where build_index looks: the vectors are found as if this MiniLM had encoded the corpus.
    vectors_file = vectors_path(Path(job["workdir"]) / "cache", embedder, corpus, _max_length())
    start = time.perf_counter()
    if not vectors_file.exists():
        write_vectors(vectors_file, size, _passage_vectors(size, dimension))
    vectors_s = time.perf_counter() - start
    doc_vectors = np.load(vectors_file, mmap_mode="r")
    np.save(folder / "questions.npy", _questions(doc_vectors, dimension))

    configs = [IndexConfig().resolve(passages=size, dimension=dimension)]
    for kind in job["also_kinds"]:
        config = IndexConfig(kind=kind).resolve(passages=size, dimension=dimension)
        if config not in configs:
            configs.append(config)
    built = []
    for config in configs:
        dumped = config.model_dump(mode="json", exclude_none=True)
        index = _build(embedder, corpus, job, dumped)
        files = list(vectors_file.parent.glob(f"{vectors_file.stem}.{config.kind}-*.faiss"))
        built.append(
            {
                "config": dumped,
                "build_s": index.build_seconds,
                "file_bytes": sum(file.stat().st_size for file in files),
            }
        )
    return {
        "dimension": dimension,
        "vectors_file": str(vectors_file),
        "vectors_bytes": vectors_file.stat().st_size,
        "corpus_s": corpus_s,
        "vectors_s": vectors_s,
        "indexes": built,
    }


def _search_child(job: dict[str, Any]) -> dict[str, Any]:
    """Each index's top-5 agreement with exact search and milliseconds per batch, one thread."""
    import faiss

    embedder, corpus = _load(job)
    questions = np.load(_folder(job) / "questions.npy")
    indexes = [_build(embedder, corpus, job, config) for config in job["configs"]]
    missed = [index.index_config.kind for index in indexes if not index.cache_hit]
    if missed:
        raise SystemExit(f"the {', '.join(missed)} index was built again: the cache was not read")
    doc_vectors = indexes[0].doc_vectors

    def exact(batch: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found: tuple[np.ndarray, np.ndarray] = faiss.knn(
            batch, doc_vectors, k, metric=faiss.METRIC_INNER_PRODUCT
        )
        return found

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    exact_scores, exact_positions = exact(questions, max(_SPECTRUM))
    exact_positions = exact_positions[:, :_K]
    faiss.omp_set_num_threads(1)
    _, exact_ms = _timed(exact, questions[: _EXACT_TIMED_BATCHES * _BATCH])
    results = []
    for index in indexes:
        positions, ms = _timed(index.search, questions)
        shared = [
            len(set(found) & set(expected)) / _K
            for found, expected in zip(positions.tolist(), exact_positions.tolist(), strict=True)
        ]
        results.append({"agreement": float(np.mean(shared)), "ms": ms})
    spectrum = {rank: float(exact_scores[:, rank - 1].mean()) for rank in _SPECTRUM}
    return {"exact_ms": exact_ms, "spectrum": spectrum, "indexes": results}


def _timed(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], questions: np.ndarray
) -> tuple[np.ndarray, float]:
    """(top-k positions of every question, median milliseconds per batch of _BATCH)."""
    search(questions[:_BATCH], _K)  # untimed: the first touches of the memory maps
    found, seconds = [], []
    for start in range(0, len(questions), _BATCH):
        began = time.perf_counter()
        _, positions = search(questions[start : start + _BATCH], _K)
        seconds.append(time.perf_counter() - began)
        found.append(positions)
    return np.concatenate(found), 1000 * statistics.median(seconds)


def _trial_child(role: str, job: dict[str, Any]) -> dict[str, Any]:
    """Load what a trial of ``role`` holds, search, and report; then wait, alive, on stdin until
    the parent has measured it and its partner."""
    # Every role imports what a trial imports (datasets, trainers.index too): the baseline differs
    # from a trial by its data alone.
    import datasets  # noqa: F401
    import faiss
    import torch

    import trainers.index  # noqa: F401

    torch.set_num_threads(1)  # as dispatch runs a trial of one CPU
    faiss.omp_set_num_threads(1)
    embedder, corpus = _load(job)
    held: list[object] = [embedder, corpus]  # alive until measured
    report: dict[str, Any] = {"role": role}
    if role != "baseline":
        batches = np.load(_folder(job) / "questions.npy")[: _TRIAL_BATCHES * _BATCH]
        start = time.perf_counter()
        if role == "mapped":
            index = _build(embedder, corpus, job, job["config"])
            report["cache_hit"] = index.cache_hit
            held.append(index)
            for begin in range(0, len(batches), _BATCH):
                _, positions = index.search(batches[begin : begin + _BATCH], _K)
                held.append(
                    (index.rows(positions, torch.device("cpu")), index.documents(positions))
                )
        else:
            held.append(_before_memory_maps(corpus, Path(job["vectors_file"]), batches))
        report["wall_s"] = time.perf_counter() - start
    gc.collect()
    print(json.dumps(report), flush=True)
    sys.stdin.read()
    del held
    return report


def _before_memory_maps(corpus: Any, vectors_file: Path, questions: np.ndarray) -> list[object]:
    """What a trial held before the index was memory-mapped, and its searches: the vectors read
    whole, an IndexFlatIP copy of them, every passage as a Document and an id -> row dict."""
    import faiss
    import torch

    documents = tuple(document for batch in corpus.batches(_CHUNK) for document in batch)
    rows = {document.id: row for row, document in enumerate(documents)}
    doc_vectors = np.load(vectors_file, allow_pickle=False)
    flat = faiss.IndexFlatIP(doc_vectors.shape[1])
    flat.add(doc_vectors)
    device_vectors = torch.from_numpy(doc_vectors)  # what vectors(device) gave on the CPU
    hits = []
    for start in range(0, len(questions), _BATCH):
        _, positions = flat.search(questions[start : start + _BATCH], _K)
        hits.append(([documents[p] for p in positions.reshape(-1)], device_vectors[positions]))
    return [documents, rows, doc_vectors, flat, hits]


def _child_main(role: str, job: dict[str, Any]) -> None:
    setup_environment()
    if role == "prepare":
        print(json.dumps(_prepare_child(job)))
    elif role == "search":
        print(json.dumps(_search_child(job)))
    else:
        _trial_child(role, job)


# --- the parent ----------------------------------------------------------------------------------


def _command(role: str, job: dict[str, Any]) -> list[str]:
    return [sys.executable, __file__, "--child", role, "--job", json.dumps(job)]


def _failed(what: str, code: int | None, log: Path) -> SystemExit:
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    return SystemExit(f"{what} exited with {code}; its log, {log}, ends:\n" + "\n".join(tail))


def _run(role: str, job: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run one child to its end; its last line of output, as JSON."""
    with log.open("w") as errors:
        child = subprocess.run(
            _command(role, job), stdout=subprocess.PIPE, stderr=errors, text=True, check=False
        )
    if child.returncode != 0:
        raise _failed(f"the {role} process", child.returncode, log)
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def _pair(
    roles: tuple[str, str],
    jobs: tuple[dict[str, Any], dict[str, Any]],
    logs: Path,
    shared: Path,
    label: str,
) -> list[dict[str, Any]]:
    """Two trial children at once, both measured while both are alive: their reports and memory;
    their logs are ``logs/<label>-<role>-<0 or 1>.log``."""
    children = []
    for number, (role, job) in enumerate(zip(roles, jobs, strict=True)):
        log = logs / f"{label}-{role}-{number}.log"
        with log.open("w") as errors:
            process = subprocess.Popen(
                _command(role, job),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        children.append((process, role, log))
    try:
        reports = []
        for process, role, log in children:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                raise _failed(f"the {role} trial", process.wait(), log)
            reports.append(json.loads(line))
        measured = [_memory(process.pid, shared) for process, _, _ in children]
    finally:
        for process, _, _ in children:
            assert process.stdin is not None
            process.stdin.close()
            process.wait()
    return [report | memory for report, memory in zip(reports, measured, strict=True)]


def _memory(pid: int, shared: Path) -> dict[str, int]:
    """A process' USS, PSS and RSS, and its RSS, PSS and private pages in the files under
    ``shared`` (the cache and the corpus)."""
    process = psutil.Process(pid)
    full = process.memory_full_info()
    mapped = [m for m in process.memory_maps(grouped=True) if m.path.startswith(f"{shared}/")]
    return {
        "uss": full.uss,
        "pss": full.pss,
        "rss": full.rss,
        "files_rss": sum(m.rss for m in mapped),
        "files_pss": sum(m.pss for m in mapped),
        "files_private": sum(m.private_clean + m.private_dirty for m in mapped),
    }


def _describe(config: dict[str, Any]) -> str:
    kind = str(config["kind"])
    if kind == "hnsw":
        return f"hnsw M {config['hnsw_links']}, ef {config['hnsw_ef_search']}"
    if kind in ("ivf_flat", "ivf_pq"):
        return f"{kind} nlist {config['nlist']}, nprobe {config['nprobe']}"
    return kind


def _legacy(
    size: int,
    job: dict[str, Any],
    vectors_bytes: int,
    per_document: float | None,
    logs: Path,
    shared: Path,
) -> tuple[float, bool]:
    """(the pre-memory-map design's USS beyond models, measured) at ``size``: emulated where it
    fits, estimated otherwise (or where the emulation was killed)."""
    estimate = 2 * vectors_bytes + size * (per_document or _GUESSED_DOCUMENT_BYTES)
    if estimate < _LEGACY_MEMORY_SHARE * psutil.virtual_memory().available:
        try:
            legacy, partner = _pair(
                ("legacy", "baseline"),
                (job, {**job, "size": None}),
                logs,
                shared,
                f"{size}-before-memory-maps",
            )
        except SystemExit as e:  # killed for memory, most likely: say so and estimate
            print(f"  the pre-memory-map emulation failed, estimated instead: {e}", flush=True)
        else:
            return legacy["uss"] - partner["uss"], True
    return float(estimate), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=_DEFAULT_SIZES, help="corpus sizes, comma-separated")
    parser.add_argument(
        "--also-kinds",
        default="ivf_flat",
        help="index kinds measured besides the default at every size (ivf_flat, ivf_pq, hnsw)",
    )
    parser.add_argument("--workdir", type=Path, help="kept; default: a folder under /tmp")
    parser.add_argument("--keep", action="store_true", help="keep the default folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.job)
        if job.get("size") is None:
            job.pop("size", None)
        _child_main(args.child, job)
        return
    sizes = sorted(int(size) for size in args.sizes.split(","))
    if sizes[0] < _QUESTIONS:
        parser.error(f"--sizes: at least {_QUESTIONS} passages (the questions' passages differ)")
    also_kinds = [kind for kind in args.also_kinds.split(",") if kind]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ragsweep-bench-index-scale-"))
    workdir = workdir.resolve()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    setup_environment()
    # The corpora's Arrow files and manifests beside the rest, mapped from there, removed with it.
    os.environ["HF_DATASETS_CACHE"] = str(workdir / "datasets")
    try:
        _measure(sizes, also_kinds, workdir, logs)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept: {workdir}")


def _measure(sizes: list[int], also_kinds: list[str], workdir: Path, logs: Path) -> None:
    before = load_average()
    base_job: dict[str, Any] = {"workdir": str(workdir), "also_kinds": also_kinds}
    baseline = _pair(("baseline", "baseline"), (base_job, base_job), logs, workdir, "models")
    base_uss = statistics.mean(report["uss"] for report in baseline)
    base_pss = statistics.mean(report["pss"] for report in baseline)
    print(
        f"models (MiniLM, the libraries imported): USS {base_uss / _MB:.0f} MB, "
        f"PSS {base_pss / _MB:.0f} MB a process (two at once)",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    per_document: float | None = None  # pre-memory-map bytes a passage, beyond two vector copies
    for size in sizes:
        job = {**base_job, "size": size}
        started = time.perf_counter()
        prepared = _run("prepare", job, logs / f"{size}-prepare.log")
        builds = ", ".join(
            f"{_describe(built['config'])} {built['build_s']:.1f} s"
            for built in prepared["indexes"]
        )
        print(
            f"{size:,} passages: corpus written and read {prepared['corpus_s']:.1f} s, vectors "
            f"{prepared['vectors_s']:.1f} s, index builds: {builds}",
            flush=True,
        )
        configs = [built["config"] for built in prepared["indexes"]]
        searched = _run("search", {**job, "configs": configs}, logs / f"{size}-search.log")
        job["vectors_file"] = prepared["vectors_file"]
        legacy_bytes, legacy_measured = _legacy(
            size, job, prepared["vectors_bytes"], per_document, logs, workdir
        )
        if legacy_measured:
            per_document = (legacy_bytes - 2 * prepared["vectors_bytes"]) / size
        for number, (built, search) in enumerate(
            zip(prepared["indexes"], searched["indexes"], strict=True)
        ):
            trial_job = {**job, "config": built["config"]}
            label = f"{size}-{built['config']['kind']}"
            trials = _pair(("mapped", "mapped"), (trial_job, trial_job), logs, workdir, label)
            if not all(trial["cache_hit"] for trial in trials):
                raise SystemExit(f"a trial of {size:,} passages built its index: no cache hit")
            rows.append(
                {
                    "size": size,
                    "default": number == 0,
                    "config": built["config"],
                    "vectors_bytes": prepared["vectors_bytes"],
                    "file_bytes": built["file_bytes"],
                    "uss": statistics.mean(trial["uss"] for trial in trials) - base_uss,
                    "files_private": statistics.mean(trial["files_private"] for trial in trials),
                    "pss_files": sum(trial["files_pss"] for trial in trials),
                    "rss_files": statistics.mean(trial["files_rss"] for trial in trials),
                    "legacy": legacy_bytes if number == 0 else None,
                    "legacy_measured": legacy_measured,
                    "agreement": search["agreement"],
                    "ms": search["ms"],
                    "exact_ms": searched["exact_ms"],
                    "spectrum": searched["spectrum"],
                }
            )
        print(f"  measured in {time.perf_counter() - started:.0f} s", flush=True)
    _report(rows, before)


def _report(rows: list[dict[str, Any]], before: str) -> None:
    print(f"load average: before {before}; after {load_average()}")
    print(
        f"memory: two trials at once, each {_TRIAL_BATCHES} batches of {_BATCH} questions at "
        f"k={_K} with rows() and documents() of the hits, 1 thread; agreement and speed: "
        f"{_QUESTIONS} questions, ms per batch of {_BATCH} on 1 FAISS thread"
    )
    print()
    print(
        "| passages | kind | vectors + index file GB | USS beyond models MB (in files) "
        "| PSS of 2 trials in files GB (copies) | before memory maps: growth GB "
        "| top-5 agreement | ms / batch (exact) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        copies = row["pss_files"] / row["rss_files"] if row["rss_files"] else float("nan")
        legacy = "-"
        if row["legacy"] is not None:
            legacy = f"{row['legacy'] / _GB:.2f}" + ("" if row["legacy_measured"] else " est.")
        print(
            f"| {row['size']:,} | {_describe(row['config'])}{' (default)' if row['default'] else ''} "
            f"| {row['vectors_bytes'] / _GB:.3f} + {row['file_bytes'] / _GB:.3f} "
            f"| {row['uss'] / _MB:.0f} ({row['files_private'] / _MB:.0f}) "
            f"| {row['pss_files'] / _GB:.3f} ({copies:.2f}) "
            f"| {legacy} | {row['agreement']:.3f} "
            f"| {row['ms']:.1f} ({row['exact_ms']:.1f}) |"
        )
    print()
    defaults = [row for row in rows if row["default"]]
    first, last = defaults[0], defaults[-1]
    span = f"{first['size']:,} -> {last['size']:,} passages"
    print(
        f"USS growth beyond models, {span}: {(last['uss'] - first['uss']) / _MB:.0f} MB "
        "(target < 200 MB)"
    )
    estimated = "" if first["legacy_measured"] and last["legacy_measured"] else " (est.)"
    print(
        f"before memory maps, the same growth: {(last['legacy'] - first['legacy']) / _GB:.2f} GB"
        f"{estimated}"
    )
    for row in defaults:
        print(
            f"{row['size']:,} passages, two trials: PSS in the cached files "
            f"{row['pss_files'] / _GB:.3f} GB against {row['rss_files'] / _GB:.3f} GB one trial "
            f"maps ({row['pss_files'] / row['rss_files']:.2f} copies); the files hold "
            f"{(row['vectors_bytes'] + row['file_bytes']) / _GB:.3f} GB of index"
        )
    for row in defaults:
        scores = " / ".join(f"{score:.3f}" for score in row["spectrum"].values())
        print(
            f"{row['size']:,} passages, mean exact score at ranks "
            f"{' / '.join(row['spectrum'])}: {scores}"
        )
    print(
        f"top-5 agreement with exact search, default index at {last['size']:,} passages "
        f"({_describe(last['config'])}): {last['agreement']:.3f} (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
