"""trainers.corpus: passages read by position and found by id without a dict of every id, streamed
in order, fingerprinted from their files once per version (a study launched on each format:
tests/search/test_corpus_files.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest
from pydantic import ValidationError

import trainers.corpus
import trainers.data
from tests.tiny import TINY_DATA
from trainers.config import CorpusColumns, DataConfig
from trainers.corpus import Corpus, Document
from trainers.data import load_data
from trainers.errors import DataError

PASSAGES: list[dict[str, str]] = [
    {"id": f"d{i}", "title": f"Title {i % 4}", "text": f"Fact number {i} about title {i % 4}."}
    for i in range(10)
]


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A datasets cache of this test's own: its Arrow conversions and corpus manifests."""
    folder = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(folder))
    return folder


def _jsonl(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _parquet(path: Path, rows: list[dict[str, object]]) -> str:
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return str(path)


def _questions(path: Path, n: int = 4) -> str:
    rows = [
        {
            "id": f"q{i}",
            "question": f"What is fact {i}?",
            "answers": [f"number {i}"],
            "gold_doc_ids": [f"d{i}"],
        }
        for i in range(n)
    ]
    return _jsonl(path, rows)


def _load(tmp_path: Path, corpus_path: str, **data: object) -> trainers.data.RagData:
    return load_data(
        DataConfig.model_validate(
            {
                "source": "jsonl",
                "path": _questions(tmp_path / "q.jsonl"),
                "corpus_path": corpus_path,
                "n_train": None,
                "n_validation": 1,
                **data,
            }
        )
    )


# --- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("write", [_jsonl, _parquet], ids=["jsonl", "parquet"])
def test_rows_are_read_by_position_in_the_order_asked(write, tmp_path, hf_cache):
    corpus = _load(tmp_path, write(tmp_path / f"c.{write.__name__[1:]}", PASSAGES)).corpus
    assert len(corpus) == 10
    assert corpus.documents([7, 2, 7]) == [
        Document(**PASSAGES[7]),
        Document(**PASSAGES[2]),
        Document(**PASSAGES[7]),
    ]
    assert corpus.documents([]) == []


def test_positions_are_found_by_id_and_an_unknown_id_is_named(tmp_path, hf_cache):
    corpus = _load(tmp_path, _jsonl(tmp_path / "c.jsonl", PASSAGES)).corpus
    assert corpus.positions(["d9", "d0", "d3"]).tolist() == [9, 0, 3]
    # Not found: absent, a prefix of an id, longer than every id.
    assert corpus.lookup(["d5", "d", "d10", "d0-much-longer-than-any-id"]).tolist() == [
        5,
        -1,
        -1,
        -1,
    ]
    with pytest.raises(DataError, match="has no document 'd10'") as error:
        corpus.positions(["d1", "d10"])
    assert "data.corpus_path" in str(error.value) and "\n" not in str(error.value)


def test_integer_ids_in_a_file_are_found_as_text(tmp_path, hf_cache):
    rows = [{**row, "id": number} for number, row in enumerate(PASSAGES, start=100)]
    corpus = Corpus.from_dataset(
        datasets.Dataset.from_list(rows),
        columns=CorpusColumns(),
        where="the test corpus",
        source_files=None,
    )
    assert corpus.positions(["105"]).tolist() == [5]
    assert corpus.documents([5])[0].id == "105"


def test_batches_cover_every_row_once_in_order(tmp_path, hf_cache):
    corpus = _load(tmp_path, _parquet(tmp_path / "c.parquet", PASSAGES)).corpus
    batches = list(corpus.batches(3))
    assert [len(batch) for batch in batches] == [3, 3, 3, 1]
    assert [d.id for batch in batches for d in batch] == [row["id"] for row in PASSAGES]
    # Shards, as an encoder splits the rows: together, the whole corpus once, in order.
    shards = [corpus.batches(4, start=start, stop=start + 5) for start in (0, 5)]
    assert [d.id for shard in shards for batch in shard for d in batch] == [
        row["id"] for row in PASSAGES
    ]


def test_gold_documents_are_found_by_title_in_a_corpus_file(tmp_path, hf_cache):
    corpus = _load(tmp_path, _parquet(tmp_path / "c.parquet", PASSAGES)).corpus
    assert corpus.titled(["Title 1", "Title 3", "Nowhere"]) == {
        "Title 1": ["d1", "d5", "d9"],
        "Title 3": ["d3", "d7"],
    }


def test_hub_style_columns_are_mapped(tmp_path, hf_cache):
    rows = [
        {
            "id": row["id"],
            "title": row["title"],
            "content": row["text"],
            "contents": f"{row['title']}. {row['text']}",
            "wiki_id": "w",
        }
        for row in PASSAGES
    ]
    path = _parquet(tmp_path / "wiki.parquet", rows)
    content = _load(tmp_path, path, corpus_columns={"text": "content"}).corpus
    assert content.documents([4]) == [Document(**PASSAGES[4])]
    contents = _load(tmp_path, path, corpus_columns={"title": None, "text": "contents"}).corpus
    assert contents.documents([4]) == [Document("d4", "", "Title 0. Fact number 4 about title 0.")]
    with pytest.raises(DataError, match="lacks the column.s. text: .*data.corpus_columns"):
        _load(tmp_path, path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([PASSAGES[0], PASSAGES[1], PASSAGES[0]], "has document id 'd0' twice"),
        ([PASSAGES[0], {**PASSAGES[1], "text": "  "}], "document 'd1' has no id or empty text"),
    ],
    ids=["duplicate_id", "blank_text"],
)
def test_a_bad_corpus_file_is_one_line(rows, message, tmp_path, hf_cache):
    with pytest.raises(DataError, match=message) as error:
        _load(tmp_path, _jsonl(tmp_path / "c.jsonl", rows))
    assert "data.corpus_path" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"corpus_path": "c.jsonl", "corpus_hub_name": "MedRAG/wikipedia"}, "keep one"),
        ({"corpus_columns": {"text": "content"}}, "set one of them or remove"),
        ({"corpus_hub_split": "test"}, "needs data.corpus_hub_name"),
        ({"corpus_path": "c.jsonl", "corpus_columns": {"id": "x", "text": "x"}}, "of its own"),
        ({"corpus_path": "c.jsonl", "corpus_columns": {"txt": "x"}}, "Extra inputs"),
    ],
)
def test_a_bad_corpus_section_is_refused(data, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig.model_validate({"source": "popqa", "path": "q.jsonl", **data})


def test_new_corpus_fields_are_left_out_of_the_stored_config_while_default():
    """Trials stored before the fields existed keep their config, and so their hash."""
    dumped = TINY_DATA.model_dump(mode="json")
    assert not {key for key in dumped if key.startswith("corpus_") and key != "corpus_path"}


def test_a_hub_corpus_not_in_the_local_cache_is_one_line_offline(tmp_path, hf_cache):
    # HF_HUB_OFFLINE=1 (tests/conftest.py): the hub is out of reach, as on a cluster node.
    with pytest.raises(DataError) as error:
        load_data(
            DataConfig(
                source="jsonl",
                path=_questions(tmp_path / "q.jsonl"),
                corpus_hub_name="MedRAG/wikipedia",
                corpus_columns=CorpusColumns(text="content"),
            )
        )
    message = str(error.value)
    assert "\n" not in message
    assert "cannot load corpus 'MedRAG/wikipedia' from the Hugging Face hub (offline" in message
    assert "data.corpus_path" in message


# --- fingerprints --------------------------------------------------------------------------------


def test_a_small_corpus_keeps_the_fingerprints_stored_before_manifests(tmp_path, hf_cache):
    """The index cache key and the data fingerprint of corpora up to _HASHED_PASSAGES are those
    every passage gave before: vectors cached and trials stored then are found again."""
    data = _load(tmp_path, _jsonl(tmp_path / "c.jsonl", PASSAGES))
    in_order = hashlib.sha256()
    for row in PASSAGES:
        in_order.update(json.dumps([row["id"], row["title"], row["text"]]).encode())
    in_memory = Corpus.from_documents((Document(**row) for row in PASSAGES), where="memory")
    assert in_memory.fingerprint == in_order.hexdigest()
    # The data fingerprint hashes the passages, not the file: JSONL and Parquet agree.
    parquet = _load(tmp_path, _parquet(tmp_path / "c.parquet", PASSAGES))
    assert parquet.fingerprint == data.fingerprint


def test_a_changed_file_changes_the_fingerprint(tmp_path, hf_cache, monkeypatch):
    monkeypatch.setattr(trainers.data, "_HASHED_PASSAGES", 0)  # as a corpus of millions
    path = tmp_path / "c.jsonl"
    before = _load(tmp_path, _jsonl(path, PASSAGES))
    changed = [*PASSAGES[:-1], {**PASSAGES[-1], "text": "A fact that changed."}]
    after = _load(tmp_path, _jsonl(path, changed))
    assert after.corpus.fingerprint != before.corpus.fingerprint
    assert after.fingerprint != before.fingerprint
    assert after.corpus.documents([9])[0].text == "A fact that changed."


def test_an_unchanged_file_is_read_from_its_manifest_not_hashed_again(
    tmp_path, hf_cache, monkeypatch
):
    monkeypatch.setattr(trainers.data, "_HASHED_PASSAGES", 0)  # as a corpus of millions
    path = _jsonl(tmp_path / "c.jsonl", PASSAGES)
    first = _load(tmp_path, path)
    (manifest,) = (hf_cache / "ragsweep-corpora").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["fingerprint"] == first.corpus.fingerprint

    def not_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unchanged corpus was checked, hashed or indexed again")

    for name in ("_files_digest", "_rows_digest", "_id_index", "_check_rows", "check_utf8"):
        monkeypatch.setattr(trainers.corpus, name, not_again)
    # Nor is any passage read to load the data: the gold ids are looked up in the id index.
    monkeypatch.setattr(Corpus, "documents", not_again)
    again = _load(tmp_path, path)
    assert (again.fingerprint, again.corpus.fingerprint) == (
        first.fingerprint,
        first.corpus.fingerprint,
    )
