"""The frozen index: vectors memory-mapped from the cache, each FAISS kind built once and cached,
exact search unchanged, approximate search close to it, and the index section of the config."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.tiny import TINY_TRAINING, tiny_config
from trainers.config import EXACT_SEARCH_MAX_PASSAGES, IndexConfig, TrialConfig
from trainers.corpus import Corpus, Document
from trainers.encode import vectors_path
from trainers.errors import ConfigError, DataError
from trainers.index import DocumentIndex, build_index
from trainers.models import load_embedder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def embedder(cache_dir: Path):
    return load_embedder("tiny", cache_dir=cache_dir, device=CPU)


def _documents(n: int) -> Corpus:
    return Corpus.from_documents(
        (Document(id=f"d{i}", title=f"Title {i}", text=f"fact number {i}") for i in range(n)),
        where="the test corpus",
    )


def _unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _topical(n: int, dimension: int, seed: int) -> np.ndarray:
    """Unit vectors around 100 topics, overlapping (as passage embeddings do): seeded."""
    rng = np.random.default_rng(seed)
    topics = np.random.default_rng(0).standard_normal((100, dimension))
    return _unit(topics[rng.integers(0, 100, n)] + 1.5 * rng.standard_normal((n, dimension)))


# The corpus of the approximate-search tests: 5,000 passages whose vectors are written into the
# cache directly (encoding them is not what is tested), as build_index would have written them.
N_PASSAGES, DIMENSION = 5000, 64


@pytest.fixture
def corpus_cache(embedder, tmp_path: Path) -> tuple[Corpus, np.ndarray, Path]:
    documents = _documents(N_PASSAGES)
    doc_vectors = _topical(N_PASSAGES, DIMENSION, seed=1)
    path = vectors_path(tmp_path, embedder, documents, TINY_TRAINING.embedder_max_length)
    path.parent.mkdir()
    np.save(path, doc_vectors)
    return documents, doc_vectors, tmp_path


@pytest.fixture
def one_faiss_thread():
    """FAISS on one thread: its OpenMP threads spin against the other test worker on a 2-core
    machine (with both cores busy, the ivf_pq build took 17 s on two threads, 4 s on one)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def _build(embedder, documents, cache_dir: Path, index: IndexConfig | None = None, **options):
    return build_index(
        embedder,
        documents,
        cache_dir=cache_dir,
        max_length=TINY_TRAINING.embedder_max_length,
        index=index,
        **options,
    )


def _mapped_files() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()}


def test_cached_vectors_are_a_read_only_memory_map_that_two_loads_share(embedder, tmp_path):
    documents = _documents(30)
    first = _build(embedder, documents, tmp_path)  # encodes, writes, then maps the file
    second = _build(embedder, documents, tmp_path)  # reads the cache
    assert not first.cache_hit and second.cache_hit
    for index in (first, second):
        assert isinstance(index.doc_vectors, np.memmap)
        assert not index.doc_vectors.flags.writeable
    assert first.doc_vectors.filename == second.doc_vectors.filename
    assert str(second.doc_vectors.filename) in _mapped_files()
    np.testing.assert_array_equal(first.doc_vectors, second.doc_vectors)


def test_with_the_cache_off_the_vectors_stay_in_memory_and_nothing_is_written(embedder, tmp_path):
    index = _build(embedder, _documents(30), tmp_path, use_cache=False)
    assert type(index.doc_vectors) is np.ndarray and not index.cache_hit
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("damage", [b"", b"\x93NUMPY not really"], ids=["empty", "garbled"])
def test_a_damaged_cache_file_is_named_with_the_fix(damage, embedder, corpus_cache):
    documents, _, cache_dir = corpus_cache
    (vectors_file,) = (cache_dir / "index").glob("*.npy")
    vectors_file.write_bytes(damage)
    with pytest.raises(DataError, match="cannot read the document vectors .*delete the file"):
        _build(embedder, documents, cache_dir)
    vectors_file.unlink()
    _build(embedder, _documents(30), cache_dir, IndexConfig(kind="hnsw"))
    (index_file,) = (cache_dir / "index").glob("*.faiss")
    index_file.write_bytes(damage)
    with pytest.raises(DataError, match="cannot read the FAISS index .*delete the file"):
        _build(embedder, _documents(30), cache_dir, IndexConfig(kind="hnsw"))


def test_flat_search_equals_a_plain_index_flat_ip(embedder, tmp_path):
    documents = _documents(200)
    questions = _unit(np.random.default_rng(2).standard_normal((64, 64)))
    plain = faiss.IndexFlatIP(64)  # the index every trial built for itself before memory maps
    for index_config in (None, IndexConfig(kind="flat")):  # the default is exact here
        index = _build(embedder, documents, tmp_path, index_config)
        assert index.index_config == IndexConfig(kind="flat")
        if plain.ntotal == 0:
            plain.add(np.array(index.doc_vectors))
        scores, positions = index.search(questions, 5)
        expected_scores, expected_positions = plain.search(questions, 5)
        np.testing.assert_array_equal(positions, expected_positions)
        np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)


def test_exact_search_reads_the_memory_map_without_copying_it(embedder, tmp_path):
    index = _build(embedder, _documents(30), tmp_path)
    # faiss.knn passes a C-contiguous float32 array to FAISS as it is.
    assert index.doc_vectors.flags.c_contiguous and index.doc_vectors.dtype == np.float32
    assert np.shares_memory(np.ascontiguousarray(index.doc_vectors), index.doc_vectors)


# (config, lowest top-5 agreement with exact search): measured on this corpus at 0.98 (ivf_flat),
# 1.0 (hnsw) and 0.88 (ivf_pq, whose 2-dimension codes reorder near ties).
APPROXIMATE = {
    "ivf_flat": (IndexConfig(kind="ivf_flat", nprobe=32), 0.95),
    "hnsw": (IndexConfig(kind="hnsw"), 0.95),
    "ivf_pq": (IndexConfig(kind="ivf_pq", nprobe=32, pq_subquantizers=32), 0.8),
}


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_each_kind_is_built_once_cached_and_agrees_with_exact_search(
    kind, embedder, corpus_cache, monkeypatch, one_faiss_thread
):
    documents, doc_vectors, cache_dir = corpus_cache
    config, agreement = APPROXIMATE[kind]
    built = _build(embedder, documents, cache_dir, config)
    assert not built.cache_hit and built.index_config.kind == kind
    (index_file,) = (cache_dir / "index").glob(f"*.{kind}-*.faiss")
    written_at = index_file.stat().st_mtime_ns

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the cached index was built again")

    monkeypatch.setattr("trainers.index._build_faiss_index", no_rebuild)
    cached = _build(embedder, documents, cache_dir, config)
    assert cached.cache_hit and index_file.stat().st_mtime_ns == written_at
    assert str(index_file) in _mapped_files()  # read as a memory map, not into the process
    assert [p.name for p in (cache_dir / "index").iterdir() if p.suffix == ".tmp"] == []

    questions = _topical(300, DIMENSION, seed=3)
    _, exact = faiss.knn(questions, doc_vectors, 5, metric=faiss.METRIC_INNER_PRODUCT)
    for index in (built, cached):
        _, found = index.search(questions, 5)
        shared = [len(set(a) & set(b)) / 5 for a, b in zip(found, exact, strict=True)]
        assert np.mean(shared) >= agreement


FLOAT16 = "float16"


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_float16_vectors_halve_the_file_and_search_as_float32_does(
    kind, embedder, corpus_cache, monkeypatch, one_faiss_thread
):
    documents, doc_vectors, cache_dir = corpus_cache
    max_length = TINY_TRAINING.embedder_max_length
    halved = vectors_path(cache_dir, embedder, documents, max_length, FLOAT16)
    assert halved != vectors_path(cache_dir, embedder, documents, max_length)
    np.save(halved, doc_vectors.astype(np.float16))
    # Exact search converts 700 rows at a time and merges the batches' top k.
    monkeypatch.setattr("trainers.index._ADD_BATCH", 700)
    config = IndexConfig(kind=kind, vector_dtype=FLOAT16)
    index = _build(embedder, documents, cache_dir, config)
    assert index.doc_vectors.dtype == np.float16 and index.index_config.vector_dtype == FLOAT16
    assert index.rows([3, 1], CPU).dtype == torch.float32

    questions = _topical(300, DIMENSION, seed=3)
    exact_scores, exact = faiss.knn(questions, doc_vectors, 5, metric=faiss.METRIC_INNER_PRODUCT)
    scores, found = index.search(questions, 5)
    shared = [len(set(a) & set(b)) / 5 for a, b in zip(found, exact, strict=True)]
    assert np.mean(shared) >= (0.99 if kind == "flat" else 0.95)
    if kind == "flat":
        np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=2e-3)
        assert (np.diff(scores, axis=1) <= 0).all()  # merged batches: highest score first


def test_a_search_setting_reuses_the_built_index(embedder, corpus_cache):
    documents, _, cache_dir = corpus_cache
    _build(embedder, documents, cache_dir, IndexConfig(kind="ivf_flat", nprobe=8))
    again = _build(embedder, documents, cache_dir, IndexConfig(kind="ivf_flat", nprobe=64))
    assert again.cache_hit and again.index_config.nprobe == 64
    assert len(list((cache_dir / "index").glob("*.faiss"))) == 1


def test_an_index_that_finds_fewer_than_k_passages_says_which_setting_to_raise(
    embedder, corpus_cache
):
    documents, doc_vectors, cache_dir = corpus_cache
    # 2,500 cells of 2 passages each on average: one probed cell cannot hold 5.
    index = _build(
        embedder, documents, cache_dir, IndexConfig(kind="ivf_flat", nlist=2500, nprobe=1)
    )
    with pytest.raises(ConfigError, match="fewer than 50 passages.*raise training.index.nprobe"):
        index.search(doc_vectors[:20], 50)


def test_a_corpus_streamed_in_chunks_is_encoded_as_one_call_encodes_it(
    embedder, tmp_path, monkeypatch
):
    whole = _build(embedder, _documents(30), tmp_path / "whole")
    monkeypatch.setattr("trainers.encode._ENCODE_CHUNK", 7)  # 5 chunks, the last of 2
    streamed = _build(embedder, _documents(30), tmp_path / "streamed")
    assert streamed.doc_vectors.shape == whole.doc_vectors.shape
    assert streamed.encoded_tokens == whole.encoded_tokens
    # Each call sorts and batches its own passages: the same vectors up to float rounding.
    np.testing.assert_allclose(streamed.doc_vectors, whole.doc_vectors, rtol=0, atol=1e-5)
    assert [p.name for p in (tmp_path / "streamed" / "index").iterdir()] == [
        vectors_path(tmp_path, embedder, _documents(30), TINY_TRAINING.embedder_max_length).name
    ]


def test_documents_are_read_by_position_in_the_shape_of_a_search(embedder, tmp_path):
    index = _build(embedder, _documents(30), tmp_path)
    found = index.documents(np.array([[3, 1], [29, 3]]))
    assert [[d.id for d in row] for row in found] == [["d3", "d1"], ["d29", "d3"]]
    assert found[1][0] == Document(id="d29", title="Title 29", text="fact number 29")


def test_rows_gathers_only_the_asked_rows_in_their_shape(embedder, tmp_path):
    index: DocumentIndex = _build(embedder, _documents(30), tmp_path)
    positions = np.array([[3, 1, 4], [1, 5, 9]])
    rows = index.rows(positions, CPU)
    assert rows.shape == (2, 3, index.doc_vectors.shape[1]) and not rows.requires_grad
    np.testing.assert_array_equal(rows.numpy(), np.asarray(index.doc_vectors)[positions])
    assert index.rows([7, 7], CPU).shape == (2, index.doc_vectors.shape[1])


# The index section of a trial's configuration.


def test_the_default_index_section_is_left_out_of_the_stored_config():
    """Trials stored before the section existed keep their config, and so their hash."""
    assert "index" not in tiny_config("none").model_dump(mode="json")["training"]
    flat = tiny_config(
        "none", training=TINY_TRAINING.model_copy(update={"index": IndexConfig(kind="flat")})
    )
    dumped = flat.model_dump(mode="json")
    assert dumped["training"]["index"] == {
        "kind": "flat",
        "nlist": None,
        "nprobe": None,
        "pq_subquantizers": None,
        "hnsw_links": None,
        "hnsw_ef_search": None,
    }
    assert TrialConfig.model_validate(dumped) == flat  # what reproduce reads back


def test_auto_searches_exactly_up_to_a_million_passages_and_with_ivf_above():
    auto = IndexConfig()
    assert auto.resolve(passages=EXACT_SEARCH_MAX_PASSAGES, dimension=384).kind == "flat"
    above = auto.resolve(passages=29_913_202, dimension=384)
    assert above.kind == "ivf_flat"
    assert above.nlist == 4 * 5469 and above.nprobe == above.nlist // 32


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "ivf"}, "'flat'"),
        ({"kind": "flat", "nlist": 100}, "nlist applies to kind ivf_flat or ivf_pq only, not flat"),
        ({"kind": "ivf_flat", "hnsw_links": 16}, "hnsw_links applies to kind hnsw only"),
        ({"kind": "hnsw", "pq_subquantizers": 8}, "pq_subquantizers applies to kind ivf_pq"),
        ({"kind": "ivf_flat", "nlist": 10, "nprobe": 20}, "nprobe 20 exceeds nlist 10"),
        ({"kind": "ivf_flat", "nlist": 0}, "greater than 0"),
    ],
)
def test_a_bad_index_section_is_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        IndexConfig.model_validate(fields)


@pytest.mark.parametrize(
    ("config", "passages", "message"),
    [
        (IndexConfig(kind="ivf_flat", nlist=100), 50, "nlist is 100 but the corpus has only 50"),
        (IndexConfig(kind="ivf_pq", pq_subquantizers=7), 5000, "use a divisor of 64"),
        (IndexConfig(kind="ivf_pq"), 100, "ivf_pq needs at least 256 passages"),
    ],
)
def test_an_index_that_cannot_fit_the_corpus_is_refused_in_one_line(config, passages, message):
    with pytest.raises(ConfigError, match=message) as error:
        config.resolve(passages=passages, dimension=64)
    assert "\n" not in str(error.value)
