"""The plan's index forecast: corpus size, kind, encode time, disk and memory, read from the spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
from rich.console import Console

from search.index_forecast import forecast_index
from search.plan import make_plan
from search.plan_table import render_plan
from search.spec import StudySpec, load_spec
from trainers import EXACT_SEARCH_MAX_PASSAGES

REPO = Path(__file__).resolve().parents[2]
PAPER_HOTPOTQA = REPO / "studies" / "paper-hotpotqa.yaml"
DEMO = REPO / "studies" / "demo.yaml"


def _spec(path: Path = DEMO, **overrides: object) -> StudySpec:
    return load_spec(path, {key.replace("__", "."): v for key, v in overrides.items()})


def _parquet_corpus(path: Path, rows: int) -> Path:
    table = pyarrow.table(
        {
            "id": [str(i) for i in range(rows)],
            "title": ["t"] * rows,
            "text": [f"passage {i}" for i in range(rows)],
        }
    )
    pyarrow.parquet.write_table(table, path)
    return path


def _with_corpus(path: Path, **overrides: object) -> StudySpec:
    return _spec(
        data__source="jsonl",
        data__path=str(path.parent / "questions.jsonl"),
        data__corpus_path=str(path),
        **overrides,
    )


def test_flat_disk_is_n_by_d_float32_plus_the_npy_header(tmp_path):
    rows, dimension = 2_000, 384
    forecast = forecast_index(_with_corpus(_parquet_corpus(tmp_path / "c.parquet", rows)))
    assert forecast.passages == rows and forecast.counted_from == "its Parquet metadata"
    assert forecast.index is not None and forecast.index.kind == "flat"
    np.save(tmp_path / "v.npy", np.zeros((rows, dimension), dtype=np.float32))
    assert forecast.vectors_bytes == rows * dimension * 4 + 128
    assert forecast.vectors_bytes == (tmp_path / "v.npy").stat().st_size
    assert forecast.disk_bytes == forecast.vectors_bytes  # flat: no FAISS file
    halved = forecast_index(
        _with_corpus(tmp_path / "c.parquet", training__index__vector_dtype="float16")
    )
    np.save(tmp_path / "v16.npy", np.zeros((rows, dimension), dtype=np.float16))
    assert halved.vectors_bytes == (tmp_path / "v16.npy").stat().st_size
    assert (forecast.node_bytes or 0) - (halved.node_bytes or 0) == rows * dimension * 2


@pytest.mark.parametrize(
    ("passages", "kind"),
    [(EXACT_SEARCH_MAX_PASSAGES, "flat"), (EXACT_SEARCH_MAX_PASSAGES + 1, "ivf_flat")],
)
def test_auto_picks_flat_up_to_a_million_passages_and_ivf_flat_above(tmp_path, passages, kind):
    # Only the row count in the Parquet footer is read: one integer column is enough.
    corpus = tmp_path / "c.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"id": np.arange(passages)}), corpus)
    forecast = forecast_index(_with_corpus(corpus))
    assert forecast.passages == passages
    assert forecast.index is not None and forecast.index.kind == kind
    if kind == "ivf_flat":
        assert forecast.index_file_bytes and forecast.index_file_bytes > passages * 384 * 4
    else:
        assert forecast.index_file_bytes == 0


def test_paper_spec_forecasts_the_wikipedia_index_offline():
    forecast = forecast_index(_spec(PAPER_HOTPOTQA))
    assert forecast.passages == 29_913_202 and "published size" in forecast.counted_from
    assert forecast.index is not None and forecast.index.kind == "ivf_flat"
    vectors = 29_913_202 * 384 * 4
    assert forecast.vectors_bytes == vectors + 128
    # IVF-Flat stores every vector again beside an int64 id, plus the centroids.
    assert vectors < (forecast.index_file_bytes or 0) < vectors * 1.01
    assert forecast.encode_gpu_s is not None and forecast.encode_cpu_s is not None
    assert 1 < forecast.encode_gpu_s / 3600 < 10  # hours on one GPU, not minutes or weeks
    assert forecast.encode_cpu_s > 100 * forecast.encode_gpu_s


def test_per_node_memory_does_not_grow_with_concurrency_and_per_trial_excludes_the_vectors():
    one = forecast_index(_spec(PAPER_HOTPOTQA, concurrency=1))
    eight = forecast_index(_spec(PAPER_HOTPOTQA, concurrency=8))
    assert one.node_bytes == eight.node_bytes and one.trial_bytes == eight.trial_bytes
    assert one.node_bytes is not None and one.trial_bytes is not None
    assert one.vectors_bytes is not None
    # 1,000 validation questions at nprobe / nlist = 1/32 visit nearly every list.
    assert one.lists_visited is not None and one.lists_visited > 0.99
    assert one.node_bytes > one.vectors_bytes * 0.9
    assert one.trial_bytes < 64 * 2**20  # the rows it gathers and the centroids, not 42 GiB


def test_ivf_lists_visited_grow_with_the_questions_searched():
    few = forecast_index(_spec(PAPER_HOTPOTQA, data__n_validation=4))
    many = forecast_index(_spec(PAPER_HOTPOTQA, data__n_validation=1000))
    assert few.lists_visited is not None and many.lists_visited is not None
    assert few.lists_visited < 0.2 < 0.99 < many.lists_visited
    assert (few.node_bytes or 0) < (many.node_bytes or 0)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "hnsw"])
def test_faiss_index_file_forecast_is_within_5_percent_of_a_built_one(tmp_path, kind):
    import faiss

    rows, dimension = 20_000, 64  # the tiny embedder's dimension
    corpus = _parquet_corpus(tmp_path / "c.parquet", rows)
    forecast = forecast_index(
        _with_corpus(corpus, models__embedder="tiny", training__index__kind=kind)
    )
    config = forecast.index
    assert config is not None and config.kind == kind and forecast.index_file_bytes
    vectors = np.random.default_rng(0).standard_normal((rows, dimension)).astype(np.float32)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, config.hnsw_links, faiss.METRIC_INNER_PRODUCT)
    else:
        quantizer = faiss.IndexFlatIP(dimension)
        if kind == "ivf_pq":
            index = faiss.IndexIVFPQ(
                quantizer,
                dimension,
                config.nlist,
                config.pq_subquantizers,
                8,
                faiss.METRIC_INNER_PRODUCT,
            )
        else:
            index = faiss.IndexIVFFlat(
                quantizer, dimension, config.nlist, faiss.METRIC_INNER_PRODUCT
            )
        index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    built = (tmp_path / "index.faiss").stat().st_size
    assert abs(forecast.index_file_bytes - built) / built < 0.05, (forecast.index_file_bytes, built)


def test_flat_on_a_gpu_puts_the_vectors_on_each_trials_gpu(tmp_path):
    corpus = _parquet_corpus(tmp_path / "c.parquet", 5_000)
    cpu = forecast_index(_with_corpus(corpus))
    gpu = forecast_index(_with_corpus(corpus, resources__gpus=1))
    assert cpu.trial_device_bytes == 0
    assert gpu.trial_device_bytes == 5_000 * 384 * 4


def test_generated_corpus_size_matches_the_generated_encyclopedia():
    from trainers import load_data

    for n_entities in (120, 33):
        spec = _spec(data__generated__n_entities=n_entities)
        assert forecast_index(spec).passages == len(load_data(spec.data).corpus)


def test_a_jsonl_corpus_is_counted_from_the_datasets_cache_once_read(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": str(i), "title": "t", "text": "x"}) + "\n" for i in range(300))
    )
    before = forecast_index(_with_corpus(corpus))
    assert before.passages is None and "unknown until the corpus is read" in before.counted_from
    assert before.index is None and before.disk_bytes is None
    datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=None)
    after = forecast_index(_with_corpus(corpus))
    assert after.passages == 300 and after.counted_from == "the datasets cache"


def test_a_missing_corpus_file_is_unknown_not_an_error(tmp_path):
    forecast = forecast_index(_with_corpus(tmp_path / "nope.parquet"))
    assert forecast.passages is None and "does not exist" in forecast.counted_from


def test_cached_vectors_of_the_corpus_shape_are_named(tmp_path):
    spec = _spec()
    passages = forecast_index(spec).passages
    assert passages is not None
    (tmp_path / "index").mkdir()
    np.save(tmp_path / "index" / "other.npy", np.zeros((passages + 1, 384), dtype=np.float32))
    assert forecast_index(spec, cache_dir=tmp_path).cached_vectors is None
    np.save(tmp_path / "index" / "abc.npy", np.zeros((passages, 384), dtype=np.float32))
    assert forecast_index(spec, cache_dir=tmp_path).cached_vectors == tmp_path / "index" / "abc.npy"
    text = _text(spec, cache_dir=tmp_path)
    assert "the cache holds vectors of this shape (abc.npy)" in text


def _text(spec: StudySpec, *, cache_dir: Path | None = None) -> str:
    console = Console(record=True, width=240)
    console.print(render_plan(make_plan(spec, cache_dir=cache_dir), spec))
    return console.export_text()


def test_plan_of_the_paper_spec_names_kind_disk_and_memory_and_exits_0_offline():
    env = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "240"}
    command = [sys.executable, "-c", "from search.cli import main; main()"]
    result = subprocess.run(
        [*command, "plan", str(PAPER_HOTPOTQA)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "retrieval index: hub corpus 'MedRAG/wikipedia'" in out
    assert "29,913,202 x 384" in out and "ivf_flat, nlist 21876, nprobe 683" in out
    assert "GPU-hours" in out and "CPU-hours" in out
    assert "85.8 GiB" in out  # disk: 42.8 GiB of vectors + the ivf_flat file
    assert "memory / node" in out and "memory / trial" in out and "32.2 MiB" in out
    assert "encodes the corpus once on the Ray cluster" in out


def test_an_index_setting_that_cannot_fit_the_corpus_is_one_line_exit_2():
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", "from search.cli import main; main()", "plan", str(DEMO)]
    settings = ["--set", "training.index.kind=ivf_pq", "--set", "training.index.pq_subquantizers=7"]
    result = subprocess.run([*command, *settings], capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pq_subquantizers" in lines[0] and "Traceback" not in result.stderr
