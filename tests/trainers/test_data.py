"""trainers.data: the generated encyclopedia, the adapters, the split and the errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

import trainers.data
from trainers._generated import generate_encyclopedia
from trainers.config import DataConfig, GeneratedDataConfig
from trainers.data import Document, QARecord, RagData, load_data
from trainers.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
POPQA_SUBSET = SHARED_DATA / "popqa_hipporag2_subset" / "popqa.json"
HOTPOTQA_DEV = SHARED_DATA / "hotpotqa_ircot_dev500" / "dev_subsampled.jsonl"

# One worker runs this module under xdist: its tests share one fresh-process run (``child``).
pytestmark = pytest.mark.xdist_group("test_data")


def _all_questions(**generated: int | float) -> RagData:
    """The generated data with every question in a split (validation 1, train the rest)."""
    return load_data(
        DataConfig(
            n_train=None, n_validation=1, generated=GeneratedDataConfig.model_validate(generated)
        )
    )


def _questions(data: RagData) -> list[QARecord]:
    return [*data.train, *data.validation]


def _passages(data: RagData) -> list[Document]:
    """Every passage of the corpus, in its order (fine for the small corpora here)."""
    return data.corpus.documents(range(len(data.corpus)))


def _shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{SHARED_DATA} not present (it is beside the repo only on dev/CI machines)")
    return path


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, object]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


# --- the generated encyclopedia ----------------------------------------------------------------


def test_generated_data_is_a_function_of_the_seed() -> None:
    first = generate_encyclopedia(GeneratedDataConfig(seed=3))
    assert generate_encyclopedia(GeneratedDataConfig(seed=3)) == first
    assert generate_encyclopedia(GeneratedDataConfig(seed=4)) != first
    assert load_data(DataConfig()).fingerprint == load_data(DataConfig()).fingerprint


def test_generated_data_is_the_same_in_a_fresh_process(child: dict[str, list[str]]) -> None:
    # String hashing is salted per process: a set iterated anywhere would change the data.
    assert child["fingerprint"] == [load_data(DataConfig()).fingerprint]


def test_generated_sizes_follow_the_config() -> None:
    data = _all_questions(n_entities=40, two_hop_fraction=0.25)
    questions = _questions(data)
    two_hop = [q for q in questions if q.id.startswith("2hop/")]
    assert len(questions) == 3 * 40
    assert len(two_hop) == round(0.25 * len(questions))
    assert len({d.title for d in _passages(data) if d.id.startswith("person/")}) == 40
    assert not [q for q in _questions(_all_questions(two_hop_fraction=0.0)) if "2hop" in q.id]


def test_every_gold_document_is_in_the_corpus() -> None:
    data = _all_questions()
    doc_ids = [d.id for d in _passages(data)]
    assert len(doc_ids) == len(set(doc_ids))
    for question in _questions(data):
        assert question.gold_doc_ids and set(question.gold_doc_ids) <= set(doc_ids)
        assert len(question.gold_doc_ids) == (2 if question.id.startswith("2hop/") else 1)
    assert data.has_context_labels


def test_answers_are_in_the_gold_passage_that_holds_the_fact() -> None:
    data = _all_questions()
    text = {d.id: d.text for d in _passages(data)}
    for question in _questions(data):
        passage = text[question.gold_doc_ids[-1]]  # two-hop: the last hop holds the answer
        for answer in question.answers:
            assert answer in passage, (question, passage)


def test_answers_carry_aliases_with_the_bare_name_first() -> None:
    questions = _questions(_all_questions())
    with_alias = [q for q in questions if len(q.answers) > 1]
    assert len(with_alias) > len(questions) / 10
    for question in with_alias:
        assert question.answers[1] == f"the {question.answers[0]}"


def test_questions_do_not_reuse_the_wording_of_their_passages() -> None:
    data = _all_questions()
    documents = {d.id: d for d in _passages(data)}
    for question in _questions(data):
        for doc_id in question.gold_doc_ids:
            document = documents[doc_id]
            names = set(_words(document.title)) | {w for a in question.answers for w in _words(a)}
            names |= {
                w
                for d in documents.values()
                if d.title in question.question
                for w in _words(d.title)
            }

            def trigrams(text: str, names: set[str] = names) -> set[tuple[str, ...]]:
                words = [w for w in _words(text) if w not in names]
                return set(zip(words, words[1:], words[2:], strict=False))

            shared = trigrams(question.question) & trigrams(document.text)
            assert not shared, (question.question, document.text, shared)
    passage_phrases = (
        "born",
        "christened",
        "died",
        "buried",
        "married",
        "apprenticed",
        "member of",
        "worked as",
        "played",
        "founded",
        "hall in",
    )
    for question in _questions(data):
        assert not [p for p in passage_phrases if p in question.question.lower()], question


def test_people_come_in_groups_of_look_alike_names() -> None:
    data = _all_questions()
    surnames: dict[str, list[str]] = defaultdict(list)
    for title in {d.title for d in _passages(data) if d.id.startswith("person/")}:
        first, surname = title.split()
        surnames[first].append(surname)

    def one_edit_apart(a: str, b: str) -> bool:
        if len(a) == len(b):
            return sum(x != y for x, y in zip(a, b, strict=True)) == 1
        short, long = sorted((a, b), key=len)
        return long.startswith(short) and len(long) - len(short) <= 2

    with_look_alike = sum(
        len(group)
        for group in surnames.values()
        if len(group) >= 2
        and all(any(one_edit_apart(s, t) for t in group if t != s) for s in group)
    )
    assert max(len(group) for group in surnames.values()) <= 3
    assert with_look_alike >= 0.9 * sum(len(group) for group in surnames.values())


def test_passages_are_short_and_name_their_entity() -> None:
    data = _all_questions()
    by_title: dict[str, int] = defaultdict(int)
    for document in _passages(data):
        assert 12 <= len(document.text.split()) <= 40, document
        assert document.title in document.text
        by_title[document.title] += 1
    assert min(by_title.values()) >= 2  # every entity has several passages that look alike


def test_two_hop_questions_name_only_the_bridge_entity() -> None:
    data = _all_questions()
    titles = {d.id: d.title for d in _passages(data)}
    two_hop = [q for q in _questions(data) if q.id.startswith("2hop/")]
    assert two_hop
    for question in two_hop:
        bridge, answer_holder = (titles[g] for g in question.gold_doc_ids)
        assert bridge in question.question
        assert answer_holder not in question.question


# --- splits and fingerprints -------------------------------------------------------------------


def test_split_has_the_configured_sizes_and_no_overlap() -> None:
    data = load_data(DataConfig(n_train=50, n_validation=20))
    train_ids, validation_ids = [q.id for q in data.train], [q.id for q in data.validation]
    assert (len(train_ids), len(validation_ids)) == (50, 20)
    assert data.split_record() == {"train_ids": train_ids, "validation_ids": validation_ids}
    assert not set(train_ids) & set(validation_ids)
    rest = load_data(DataConfig(n_train=None, n_validation=20))
    assert len(rest.train) == 3 * 120 - 20
    assert [q.id for q in rest.validation] == validation_ids


def test_a_test_split_is_held_out_without_changing_validation_or_train() -> None:
    plain = load_data(DataConfig(n_train=50, n_validation=20))
    held_out = load_data(DataConfig(n_train=50, n_validation=20, n_test=30))
    assert (held_out.validation, held_out.train) == (plain.validation, plain.train)
    test_ids = [q.id for q in held_out.test]
    assert len(test_ids) == 30 and plain.test == ()
    assert not set(test_ids) & {q.id for q in (*held_out.train, *held_out.validation)}
    assert held_out.split_record() == plain.split_record() | {"test_ids": test_ids}
    assert held_out.fingerprint != plain.fingerprint
    # Without one the fingerprint is the one stored before test splits existed.
    assert (
        plain.fingerprint
        == load_data(DataConfig(n_train=50, n_validation=20, n_test=0)).fingerprint
    )
    with pytest.raises(DataError, match=r"data.n_test \(300\) exceed the 360 questions") as error:
        load_data(DataConfig(n_train=50, n_validation=20, n_test=300))
    assert "\n" not in str(error.value)


def test_split_seed_changes_the_split_and_the_fingerprint() -> None:
    first, second = load_data(DataConfig(split_seed=0)), load_data(DataConfig(split_seed=1))
    assert _passages(first) == _passages(second)
    assert first.split_record() != second.split_record()
    assert first.fingerprint != second.fingerprint


def test_split_larger_than_the_data_is_refused() -> None:
    with pytest.raises(DataError, match="data.n_validation") as error:
        load_data(DataConfig(n_train=400, n_validation=48))
    assert "\n" not in str(error.value)
    with pytest.raises(DataError):
        load_data(DataConfig(n_train=None, n_validation=360))


# --- adapters ----------------------------------------------------------------------------------


def test_popqa_local_subset_loads_with_gold_passages() -> None:
    data = load_data(DataConfig(source="popqa", path=str(_shared(POPQA_SUBSET)), n_train=None))
    questions = _questions(data)
    text = {d.id: d.text.lower() for d in _passages(data)}
    assert len(questions) == 874
    assert len(data.corpus) == len({(d.title, d.text) for d in _passages(data)})  # deduplicated
    assert sum(bool(q.gold_doc_ids) for q in questions) >= 0.9 * len(questions)
    answered = sum(
        any(a.lower() in text[g] for a in q.answers for g in q.gold_doc_ids) for q in questions
    )
    assert answered >= 0.8 * len(questions)
    assert data.has_context_labels


def test_hotpotqa_local_sample_loads_with_gold_passages() -> None:
    data = load_data(DataConfig(source="hotpotqa", path=str(_shared(HOTPOTQA_DEV)), n_train=None))
    questions = _questions(data)
    assert len(questions) == 500
    assert all(q.answers for q in questions)
    assert sum(len(q.gold_doc_ids) >= 2 for q in questions) >= 0.9 * len(questions)
    assert len(data.corpus) == len({(d.title, d.text) for d in _passages(data)})
    assert len(data.corpus) < 10 * len(questions)  # shared paragraphs appear once


def test_popqa_hub_columns_take_gold_documents_from_a_corpus_by_title(tmp_path: Path) -> None:
    corpus = _write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {"id": "d1", "title": "Ada Quill", "text": "Ada Quill was a cartographer."},
            {"id": "d2", "title": "Ada Quill", "text": "Ada Quill lived in Brinmoor."},
            {"id": "d3", "title": "Brinmoor", "text": "Brinmoor is a town."},
        ],
    )
    questions = _write_jsonl(
        tmp_path / "popqa.jsonl",
        [
            {
                "id": 7,
                "question": "What is Ada Quill's occupation?",
                "s_wiki_title": "Ada Quill",
                "possible_answers": '["cartographer", "map maker"]',
            },
            {
                "id": 8,
                "question": "Where is Brinmoor?",
                "s_wiki_title": "Nowhere",
                "possible_answers": '["north"]',
            },
        ],
    )
    data = load_data(
        DataConfig(source="popqa", path=questions, corpus_path=corpus, n_train=1, n_validation=1)
    )
    by_id = {q.id: q for q in _questions(data)}
    assert by_id["7"].gold_doc_ids == ("d1", "d2")
    assert by_id["7"].answers == ("cartographer", "map maker")
    assert by_id["8"].gold_doc_ids == ()
    with pytest.raises(DataError, match="data.corpus_path"):
        load_data(DataConfig(source="popqa", path=questions, n_train=1, n_validation=1))


def test_popqa_paragraphs_as_a_python_repr_string_are_parsed_not_evaluated(
    tmp_path: Path,
) -> None:
    paragraphs = [
        {"title": "Ada Quill", "text": "Ada Quill drew maps.", "is_supporting": True},
        {"title": "Maps", "text": "Maps show places.", "is_supporting": False},
    ]
    row = {
        "id": 1,
        "question": "What did Ada Quill do?",
        "possible_answers": '["cartographer"]',
        "paragraphs": repr(paragraphs),
    }
    evil = {**row, "id": 2, "paragraphs": "__import__('os').getcwd()"}
    good = _write_jsonl(tmp_path / "good.jsonl", [row, {**row, "id": 3}])
    data = load_data(DataConfig(source="popqa", path=good, n_train=1, n_validation=1))
    texts = {d.id: d.text for d in _passages(data)}
    assert sorted(texts.values()) == ["Ada Quill drew maps.", "Maps show places."]
    assert [texts[g] for g in data.train[0].gold_doc_ids] == ["Ada Quill drew maps."]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [row, evil])
    with pytest.raises(DataError, match="question 2 has unreadable 'paragraphs'"):
        load_data(DataConfig(source="popqa", path=bad, n_train=1, n_validation=1))


def test_hotpotqa_hub_columns_load_from_a_local_copy(tmp_path: Path) -> None:
    row = {
        "id": "h1",
        "question": "Which guild did Ada's teacher join?",
        "answer": "Kessel Guild",
        "supporting_facts": {"title": ["Ada", "Bo"], "sent_id": [0, 0]},
        "context": {
            "title": ["Ada", "Bo", "Cy"],
            "sentences": [
                ["Ada learned from Bo.", " She was quick."],
                ["Bo joined the Kessel Guild."],
                ["Cy sold rope."],
            ],
        },
    }
    other = {**row, "id": "h2", "supporting_facts": {"title": ["Cy"], "sent_id": [0]}}
    path = _write_jsonl(tmp_path / "hotpot.jsonl", [row, other])
    data = load_data(DataConfig(source="hotpotqa", path=path, n_train=1, n_validation=1))
    texts = {d.id: d.text for d in _passages(data)}
    by_id = {q.id: q for q in _questions(data)}
    assert sorted(texts.values()) == [
        "Ada learned from Bo. She was quick.",
        "Bo joined the Kessel Guild.",
        "Cy sold rope.",
    ]
    assert [texts[g] for g in by_id["h2"].gold_doc_ids] == ["Cy sold rope."]
    assert len(by_id["h1"].gold_doc_ids) == 2


def test_canonical_jsonl_round_trip_keeps_content_and_fingerprint(tmp_path: Path) -> None:
    data = load_data(DataConfig(n_train=None))
    questions = _write_jsonl(
        tmp_path / "questions.jsonl",
        [
            {
                "id": q.id,
                "question": q.question,
                "answers": list(q.answers),
                "gold_doc_ids": list(q.gold_doc_ids),
            }
            for q in _questions(data)
        ],
    )
    corpus = _write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"id": d.id, "title": d.title, "text": d.text} for d in _passages(data)],
    )
    loaded = load_data(DataConfig(source="jsonl", path=questions, corpus_path=corpus, n_train=None))
    assert _passages(loaded) == _passages(data)
    assert loaded.train == data.train and loaded.validation == data.validation
    assert loaded.fingerprint == data.fingerprint
    assert isinstance(_passages(loaded)[0], Document)


# --- errors ------------------------------------------------------------------------------------


_CHILD_SCRIPT = """
import json
from trainers.config import DataConfig
from trainers.data import load_data
from trainers.errors import DataError
print(json.dumps({"fingerprint": load_data(DataConfig()).fingerprint}))
for source, hub_name in (("popqa", "akariasai/PopQA"), ("hotpotqa", "hotpot_qa")):
    try:
        load_data(DataConfig(source=source, hub_name=hub_name))
    except DataError as e:
        print(json.dumps({"error": str(e)}))
"""


@pytest.fixture(scope="module")
def child() -> dict[str, list[str]]:
    """What a fresh process with HF_HUB_OFFLINE=1 prints: one process, as imports take seconds.

    A subprocess because datasets reads HF_HUB_OFFLINE once, at import; it imports the same
    ``trainers`` as this test.
    """
    root = str(Path(trainers.data.__file__).parents[1])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed: dict[str, list[str]] = defaultdict(list)
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            for key, value in json.loads(line).items():
                printed[key].append(value)
    return printed


def test_hub_name_without_a_hub_raises_a_one_line_data_error(
    child: dict[str, list[str]],
) -> None:
    assert len(child["error"]) == 2
    for message, name in zip(child["error"], ("akariasai/PopQA", "hotpot_qa"), strict=True):
        assert "\n" not in message
        assert f"cannot load dataset '{name}' from the Hugging Face hub (offline" in message
        assert "data.path" in message


@pytest.mark.parametrize(
    ("files", "config", "names"),
    [
        ({}, {"path": "missing.jsonl"}, "missing.jsonl"),
        ({"q.txt": "x"}, {"path": "q.txt"}, "unknown format"),
        ({"q.jsonl": "{not json"}, {"path": "q.jsonl"}, "cannot be read"),
        ({"q.jsonl": {"id": "q1", "question": "Why?", "gold_doc_ids": []}}, {}, "answers"),
        (
            {"q.jsonl": {"id": "q1", "question": "Why?", "answers": [], "gold_doc_ids": []}},
            {},
            "has no answer",
        ),
        (
            {"q.jsonl": {"id": "q1", "question": "Why?", "answers": ["a"], "gold_doc_ids": ["x"]}},
            {},
            "gold document 'x'",
        ),
        ({"c.jsonl": {"id": "d1", "title": "T"}}, {}, "data.corpus_path"),
    ],
)
def test_bad_files_raise_a_one_line_data_error(
    tmp_path: Path, files: dict[str, object], config: dict[str, str], names: str
) -> None:
    good = {
        "q.jsonl": {"id": "q1", "question": "Why?", "answers": ["a"], "gold_doc_ids": ["d1"]},
        "c.jsonl": {"id": "d1", "title": "T", "text": "Some text."},
    }
    for name, content in {**good, **files}.items():
        text = content if isinstance(content, str) else json.dumps(content) + "\n"
        (tmp_path / name).write_text(text)
    paths = {"path": "q.jsonl", "corpus_path": "c.jsonl", **config}
    data_config = DataConfig.model_validate(
        {
            "source": "jsonl",
            "n_train": None,
            "n_validation": 1,
            **{key: str(tmp_path / name) for key, name in paths.items()},
        }
    )
    with pytest.raises(DataError, match=re.escape(names)) as error:
        load_data(data_config)
    assert "\n" not in str(error.value)


def test_duplicate_question_ids_are_refused(tmp_path: Path) -> None:
    row = {"id": "q1", "question": "Why?", "answers": ["a"], "gold_doc_ids": []}
    questions = _write_jsonl(tmp_path / "q.jsonl", [row, row])
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"id": "d1", "title": "T", "text": "Text."}])
    with pytest.raises(DataError, match="'q1' twice"):
        load_data(
            DataConfig(
                source="jsonl", path=questions, corpus_path=corpus, n_train=1, n_validation=1
            )
        )


def test_questions_without_gold_documents_mean_no_context_labels(tmp_path: Path) -> None:
    questions = _write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"id": f"q{i}", "question": "Why?", "answers": ["a"], "gold_doc_ids": []}
            for i in range(3)
        ],
    )
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"id": "d1", "title": "T", "text": "Text."}])
    data = load_data(
        DataConfig(source="jsonl", path=questions, corpus_path=corpus, n_train=None, n_validation=1)
    )
    assert len(data.train) == 2
    assert not data.has_context_labels


@pytest.mark.parametrize(
    ("n_labelled", "has_labels"), [(4, True), (2, True), (1, False), (0, False)]
)
def test_context_labels_need_two_labelled_training_questions_not_all(
    tmp_path: Path, n_labelled: int, has_labels: bool
) -> None:
    rows = [
        {"id": f"q{i}", "question": "Why?", "answers": ["a"], "gold_doc_ids": []} for i in range(6)
    ]
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"id": "d1", "title": "T", "text": "Text."}])
    config = DataConfig(
        source="jsonl",
        path=_write_jsonl(tmp_path / "q.jsonl", rows),
        corpus_path=corpus,
        n_train=4,
        n_validation=2,
    )
    train_ids = [q.id for q in load_data(config).train]  # the split depends on the ids only
    for row in rows:
        if row["id"] in train_ids[:n_labelled]:
            row["gold_doc_ids"] = ["d1"]
    _write_jsonl(tmp_path / "q.jsonl", rows)
    data = load_data(config)
    assert [q.id for q in data.labelled_train] == train_ids[:n_labelled]
    assert data.has_context_labels == has_labels
