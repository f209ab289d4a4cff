"""Questions and the retrieval corpus in one canonical schema, split and fingerprinted.

Every source becomes the same three things: documents ``{id, title, text}``, questions ``{id,
question, answers, gold_doc_ids}`` (the first answer is the training target, the rest aliases;
``gold_doc_ids`` are the context labels, empty when a question has none), and a deterministic
train/validation split. Sources:

- ``generated``: the built-in fictional encyclopedia (:mod:`trainers._generated`);
- ``popqa``: ``akariasai/PopQA`` from the hub or a local file with its columns; passages come from a
  ``paragraphs`` column (local subsets such as HippoRAG's) or from ``data.corpus_path``, where the
  gold documents are those titled like the question's ``s_wiki_title``;
- ``hotpotqa``: ``hotpot_qa`` (config "distractor") from the hub or a local copy, or the flattened
  IRCoT format (``question_text``, ``answers_objects``, ``contexts``); the corpus is every context
  paragraph, or ``data.corpus_path`` with gold documents titled like a supporting fact;
- ``jsonl``: the canonical schema itself, ``data.path`` (questions) and ``data.corpus_path``.

A corpus named by ``data.corpus_path`` (JSONL or Parquet) or ``data.corpus_hub_name`` (e.g.
``MedRAG/wikipedia``, its columns mapped by ``data.corpus_columns``) stays on disk as a
memory-mapped :class:`~trainers.corpus.Corpus`; one derived from the questions is the same type,
in memory.
Files and hub data sets are read through ``datasets``; every failure is a one-line ``DataError``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.exceptions import DatasetNotFoundError

from trainers._generated import generate_encyclopedia
from trainers.config import DataConfig
from trainers.corpus import Corpus, Document, check_utf8
from trainers.errors import DataError, one_line

__all__ = [
    "MIN_LABELLED_TRAIN",
    "Corpus",
    "Document",
    "QARecord",
    "RagData",
    "load_corpus",
    "load_data",
]

# The split each hub data set is usually evaluated on (data.hub_split overrides it): PopQA has only
# "test"; HotPotQA's "validation" is the dev set, 7.4k questions, versus 90k in "train".
_HUB_SPLITS = {"popqa": "test", "hotpotqa": "validation"}
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_Row = Mapping[str, Any]

# The fewest labelled training questions that can train the embedder on context labels. MNRL ranks
# a question's gold document against the other questions' gold documents in its batch (in-batch
# negatives): a lone labelled question has nothing to rank against (its own second gold document,
# two-hop, is masked, not a negative), and two give each one a negative. A full batch
# (training.batch_size_embedder) is not required: with fewer labelled questions the phase runs one
# smaller batch, as the last batch of every epoch already is.
MIN_LABELLED_TRAIN = 2

# Corpora up to this many passages are fingerprinted by hashing every passage, as all were before
# corpora had manifests (a fraction of a second at this size), so that the fingerprints stored
# with earlier trials still match; larger ones by the digest of their files, computed once per
# version of them (trainers.corpus).
_HASHED_PASSAGES = 100_000


@dataclass(frozen=True)
class QARecord:
    """One question; ``answers[0]`` is the training target, ``gold_doc_ids`` may be empty."""

    id: str
    question: str
    answers: tuple[str, ...]
    gold_doc_ids: tuple[str, ...]  # () = no context label


@dataclass(frozen=True)
class RagData:
    """The split questions, the corpus, and a fingerprint of both and of the split."""

    train: tuple[QARecord, ...]
    validation: tuple[QARecord, ...]
    corpus: Corpus  # read by position; never every passage as an object
    fingerprint: str  # sha256 hex of the canonical content (corpus + all questions) and the split
    test: tuple[QARecord, ...] = ()  # held out from the search (data.n_test)

    @property
    def labelled_train(self) -> tuple[QARecord, ...]:
        """The training questions with at least one gold document: what MNRL trains E on."""
        return tuple(q for q in self.train if q.gold_doc_ids)

    @property
    def has_context_labels(self) -> bool:
        """Whether enough training questions have gold documents to train E on them (MNRL):
        at least ``MIN_LABELLED_TRAIN``, not necessarily all; the others train G only."""
        return len(self.labelled_train) >= MIN_LABELLED_TRAIN

    def split_record(self) -> dict[str, object]:
        """The question ids of each split, stored with a trial so it can be rebuilt exactly."""
        split: dict[str, object] = {
            "train_ids": [q.id for q in self.train],
            "validation_ids": [q.id for q in self.validation],
        }
        if self.test:
            split["test_ids"] = [q.id for q in self.test]
        return split


def load_data(config: DataConfig) -> RagData:
    """Load ``config.source`` into the canonical schema and split it by ``config.split_seed``."""
    questions, corpus = _LOADERS[config.source](config)
    where = _where(config)
    _check_ids(questions, corpus, where)
    validation, train, test = _split(questions, config, where)
    return RagData(
        train=train,
        validation=validation,
        corpus=corpus,
        fingerprint=_fingerprint(questions, corpus, train, validation, test),
        test=test,
    )


def load_corpus(config: DataConfig) -> Corpus:
    """The corpus ``config`` retrieves from: its corpus file or hub corpus read alone (memory-mapped),
    else the one its source derives from the questions."""
    if _has_corpus(config):
        return _read_corpus(config)
    return load_data(config).corpus


# --- sources ---------------------------------------------------------------------------------


def _load_generated(config: DataConfig) -> tuple[list[QARecord], Corpus]:
    document_rows, question_rows = generate_encyclopedia(config.generated)
    where = "the generated corpus"
    corpus = Corpus.from_documents((_document(row, where) for row in document_rows), where=where)
    return [_question(row, "the generated data") for row in question_rows], corpus


def _load_jsonl(config: DataConfig) -> tuple[list[QARecord], Corpus]:
    if not (config.path and _has_corpus(config)):
        raise DataError(
            "data.source 'jsonl' needs data.path and data.corpus_path (or data.corpus_hub_name): "
            "set both"
        )
    rows = _read_local(config.path, "data.path", ("id", "question", "answers", "gold_doc_ids"))
    questions = [_question(row, f"data.path '{config.path}'") for row in rows]
    return questions, _read_corpus(config)


def _load_popqa(config: DataConfig) -> tuple[list[QARecord], Corpus]:
    rows, where = _read_source(config, ("id", "question", "possible_answers"))
    has_paragraphs = "paragraphs" in rows.column_names
    if _has_corpus(config):
        rows = _require(rows, ("s_wiki_title",), where)
    elif not has_paragraphs:
        raise DataError(
            f"{where} has no 'paragraphs' column, so no passages: set data.corpus_path to a corpus "
            "JSONL of {id, title, text} (or data.corpus_hub_name) whose titles match the "
            "questions' s_wiki_title"
        )
    examples = []
    for row in rows:
        paragraphs = (
            _popqa_paragraphs(row["paragraphs"], row["id"], where) if has_paragraphs else []
        )
        examples.append(
            _Example(
                id=row["id"],
                question=row["question"],
                answers=_popqa_answers(row["possible_answers"], row["id"], where),
                paragraphs=[
                    (p["title"], p["text"], bool(p.get("is_supporting"))) for p in paragraphs
                ],
                gold_titles=(row.get("s_wiki_title"),),
            )
        )
    return _assemble(examples, config, where)


def _load_hotpotqa(config: DataConfig) -> tuple[list[QARecord], Corpus]:
    rows, where = _read_source(config, ())
    examples = []
    if "contexts" in rows.column_names:  # the flattened IRCoT format
        for row in _require(rows, ("question_id", "question_text", "answers_objects"), where):
            paragraphs = [
                (c["title"], c["paragraph_text"], bool(c.get("is_supporting")))
                for c in row["contexts"]
            ]
            examples.append(
                _Example(
                    id=row["question_id"],
                    question=row["question_text"],
                    answers=[span for answer in row["answers_objects"] for span in answer["spans"]],
                    paragraphs=paragraphs,
                    gold_titles=tuple(title for title, _, is_gold in paragraphs if is_gold),
                )
            )
    else:  # the hub's columns
        required = ("id", "question", "answer", "supporting_facts", "context")
        for row in _require(rows, required, where):
            gold_titles = tuple(row["supporting_facts"]["title"])
            # HotPotQA keeps each sentence's leading space: joined, they read as written.
            sentences = zip(row["context"]["title"], row["context"]["sentences"], strict=False)
            examples.append(
                _Example(
                    id=row["id"],
                    question=row["question"],
                    answers=[row["answer"]],
                    paragraphs=[
                        (title, "".join(lines).strip(), title in gold_titles)
                        for title, lines in sentences
                    ],
                    gold_titles=gold_titles,
                )
            )
    return _assemble(examples, config, where)


@dataclass(frozen=True)
class _Example:
    """A PopQA or HotPotQA question before its passages have ids."""

    id: object
    question: object
    answers: object
    paragraphs: list[tuple[str, str, bool]]  # (title, text, is_gold) shipped with the question
    gold_titles: tuple[object, ...]  # the gold documents' titles, for a corpus from corpus_path


def _assemble(
    examples: Sequence[_Example], config: DataConfig, where: str
) -> tuple[list[QARecord], Corpus]:
    """Questions and corpus: ``data.corpus_path`` (or the hub corpus) with gold documents found
    by title, else the questions' own paragraphs, deduplicated, with the gold ones as labels."""
    if _has_corpus(config):
        corpus = _read_corpus(config)
        by_title = corpus.titled(
            str(title) for e in examples for title in e.gold_titles if title is not None
        )
        return [
            _question(
                {
                    "id": e.id,
                    "question": e.question,
                    "answers": e.answers,
                    "gold_doc_ids": [
                        doc_id
                        for title in e.gold_titles
                        if title is not None
                        for doc_id in by_title.get(str(title), [])
                    ],
                },
                where,
            )
            for e in examples
        ], corpus
    documents: dict[tuple[str, str], Document] = {}
    questions = []
    for example in examples:
        gold = []
        for title, text, is_gold in example.paragraphs:
            title, text = str(title or ""), str(text or "")
            if not text.strip():  # an empty paragraph is nothing to retrieve
                continue
            if (title, text) not in documents:
                documents[title, text] = Document(_content_id(title, text), title, text)
            if is_gold:
                gold.append(documents[title, text].id)
        questions.append(
            _question(
                {
                    "id": example.id,
                    "question": example.question,
                    "answers": example.answers,
                    "gold_doc_ids": gold,
                },
                where,
            )
        )
    return questions, Corpus.from_documents(documents.values(), where=f"the paragraphs of {where}")


_LOADERS: dict[str, Callable[[DataConfig], tuple[list[QARecord], Corpus]]] = {
    "generated": _load_generated,
    "popqa": _load_popqa,
    "hotpotqa": _load_hotpotqa,
    "jsonl": _load_jsonl,
}


def _popqa_paragraphs(value: object, qid: object, where: str) -> list[dict[str, Any]]:
    # Some PopQA exports store the paragraphs as a Python repr string: parse, never evaluate.
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise DataError(
                f"{where}: question {qid} has unreadable 'paragraphs': expected a list "
                "of {title, text, is_supporting}"
            ) from e
    if not isinstance(value, list) or not all(
        isinstance(p, dict) and {"title", "text"} <= p.keys() for p in value
    ):
        raise DataError(
            f"{where}: question {qid} has malformed 'paragraphs': expected a list of "
            "{title, text, is_supporting}"
        )
    return value


def _popqa_answers(answers: object, qid: object, where: str) -> object:
    if isinstance(answers, str):  # the hub and the HippoRAG subset store a JSON string
        try:
            return json.loads(answers)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: question {qid} has 'possible_answers' that is not a JSON list of strings"
            ) from e
    return answers


# --- reading ---------------------------------------------------------------------------------


def _where(config: DataConfig) -> str:
    if config.source == "generated":
        return "the generated data"
    if config.path:
        return f"data.path '{config.path}'"
    return f"hub data set '{config.hub_name}'"


def _read_source(config: DataConfig, required: Sequence[str]) -> tuple[datasets.Dataset, str]:
    """The rows of ``data.path`` if set (it wins), else of ``data.hub_name``."""
    if config.path:
        return _read_local(config.path, "data.path", required), _where(config)
    if not config.hub_name:
        raise DataError(f"data.source '{config.source}' needs data.path or data.hub_name: set one")
    split = config.hub_split or _HUB_SPLITS[config.source]
    subset = "distractor" if config.source == "hotpotqa" else None
    rows = _read_hub(config.hub_name, subset, split, _QUESTION_FIELDS)
    return _require(rows, required, _where(config)), _where(config)


def _read_local(
    path: str, field: str, required: Sequence[str], *, check_text: bool = True
) -> datasets.Dataset:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{field} '{path}' does not exist or is not a file: fix the path")
    builder = _LOCAL_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise DataError(
            f"{field} '{path}' has an unknown format: use a {', '.join(_LOCAL_BUILDERS)} file"
        )
    if file.stat().st_size == 0:
        raise DataError(f"{field} '{path}' is empty: point it at the file with the rows")
    try:
        rows = datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as e:  # datasets and pyarrow raise many types for one cause: a bad file
        raise DataError(
            f"{field} '{path}' cannot be read as {builder} "
            f"({one_line(e)}): fix or re-export the file"
        ) from e
    if check_text:  # a corpus is checked once per version of its file (trainers.corpus)
        check_utf8(rows, f"{field} '{path}'")
    return _require(rows, required, f"{field} '{path}'")


@dataclass(frozen=True)
class _HubFields:
    """How messages about a hub data set name it and the fields that fix them."""

    what: str  # "dataset" or "corpus"
    name: str  # the field naming it on the hub
    local: str  # the field pointing at a local copy instead
    split: str  # the field(s) choosing its split


_QUESTION_FIELDS = _HubFields("dataset", "data.hub_name", "data.path", "data.hub_split")
_CORPUS_FIELDS = _HubFields(
    "corpus",
    "data.corpus_hub_name",
    "data.corpus_path",
    "data.corpus_hub_split and data.corpus_hub_subset",
)


def _read_hub(
    hub_name: str, subset: str | None, split: str, fields: _HubFields
) -> datasets.Dataset:
    try:
        return datasets.load_dataset(hub_name, subset, split=split)
    except ConnectionError as e:  # offline mode (HF_HUB_OFFLINE=1) and no network both land here
        raise DataError(
            f"cannot load {fields.what} '{hub_name}' from the Hugging Face hub (offline or "
            "unreachable): download it where the hub is reachable (it is then read from the local "
            f"cache), or point {fields.local} at a local copy"
        ) from e
    except DatasetNotFoundError as e:
        raise DataError(
            f"{fields.what} '{hub_name}' is not on the Hugging Face hub: check "
            f"{fields.name}, or point {fields.local} at a local copy"
        ) from e
    except ValueError as e:  # an unknown split or subset name
        raise DataError(
            f"cannot load split '{split}' of '{hub_name}' ({one_line(e)}): check {fields.split}"
        ) from e


def _has_corpus(config: DataConfig) -> bool:
    return bool(config.corpus_path or config.corpus_hub_name)


def _read_corpus(config: DataConfig) -> Corpus:
    """The corpus of ``data.corpus_path`` or ``data.corpus_hub_name``, memory-mapped."""
    columns = config.corpus_columns
    if config.corpus_path:
        rows = _read_local(config.corpus_path, "data.corpus_path", (), check_text=False)
        return Corpus.from_dataset(
            rows,
            columns=columns,
            where=f"data.corpus_path '{config.corpus_path}'",
            source_files=[Path(config.corpus_path).expanduser()],
        )
    if not config.corpus_hub_name:
        raise DataError("no corpus is configured: set data.corpus_path or data.corpus_hub_name")
    rows = _read_hub(
        config.corpus_hub_name, config.corpus_hub_subset, config.corpus_hub_split, _CORPUS_FIELDS
    )
    # Its Arrow files in the datasets cache are what is read; their bytes identify the content.
    # None where datasets kept the rows in memory (hashed row by row then).
    arrow_files = [Path(file["filename"]) for file in rows.cache_files]
    return Corpus.from_dataset(
        rows,
        columns=columns,
        where=f"hub corpus '{config.corpus_hub_name}'",
        source_files=arrow_files or None,
    )


def _require(rows: datasets.Dataset, required: Iterable[str], where: str) -> datasets.Dataset:
    missing = [name for name in required if name not in rows.column_names]
    if missing:
        raise DataError(
            f"{where} lacks the field(s) {', '.join(missing)}: add them, or pick the "
            "data.source that matches the file's columns"
        )
    return rows


# --- canonical records -----------------------------------------------------------------------


def _document(row: _Row, where: str) -> Document:
    if row["id"] is None or not isinstance(row["text"], str) or not row["text"].strip():
        raise DataError(f"{where}: document {row['id']!r} has no id or empty text: fix the row")
    return Document(id=str(row["id"]), title=str(row["title"] or ""), text=row["text"])


def _question(row: _Row, where: str) -> QARecord:
    qid, question, answers, gold = row["id"], row["question"], row["answers"], row["gold_doc_ids"]
    if qid is None or not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: question {qid!r} has no id or empty text: fix the row")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(
            f"{where}: question {qid} needs 'answers' as a list of strings: fix the row"
        )
    if not isinstance(gold, list):
        raise DataError(
            f"{where}: question {qid} needs 'gold_doc_ids' as a list ([] for none): fix the row"
        )
    answers = [a.strip() for a in answers if a.strip()]
    if not answers:
        raise DataError(f"{where}: question {qid} has no answer: add one or drop the question")
    # dict.fromkeys: deduplicate and keep the order (the first answer is the training target).
    return QARecord(
        id=str(qid),
        question=question.strip(),
        answers=tuple(dict.fromkeys(answers)),
        gold_doc_ids=tuple(dict.fromkeys(str(g) for g in gold)),
    )


def _content_id(title: str, text: str) -> str:
    # Ids from content, not position: the same passage keeps its id in any subset or order, so
    # cached document vectors stay valid.
    return hashlib.sha256(json.dumps([title, text]).encode()).hexdigest()[:16]


def _check_ids(questions: Sequence[QARecord], corpus: Corpus, where: str) -> None:
    """Question ids are unique and every gold id names a passage (the corpus checked its own
    ids as it was opened)."""
    if not questions or not len(corpus):
        raise DataError(
            f"{where} holds {len(questions)} questions and {len(corpus)} documents: it needs both"
        )
    question_ids: set[str] = set()
    for question in questions:
        if question.id in question_ids:
            raise DataError(f"{where} has question id '{question.id}' twice: make ids unique")
        question_ids.add(question.id)
    # A gold id outside the corpus would silently teach the embedder nothing: refuse it. One
    # lookup for all of them, in the corpus' sorted ids.
    gold = [(question, doc_id) for question in questions for doc_id in question.gold_doc_ids]
    unknown = np.flatnonzero(corpus.lookup([doc_id for _, doc_id in gold]) < 0)
    if unknown.size:
        question, doc_id = gold[int(unknown[0])]
        raise DataError(
            f"{where}: question {question.id} names gold document '{doc_id}' "
            "that the corpus lacks: fix gold_doc_ids or use the matching corpus"
        )


# --- split and fingerprint -------------------------------------------------------------------


def _split(
    questions: Sequence[QARecord], config: DataConfig, where: str
) -> tuple[tuple[QARecord, ...], tuple[QARecord, ...], tuple[QARecord, ...]]:
    """(validation, train, test): shuffled by ``split_seed``, validation first, then train, then
    test, so that holding out a test split changes neither of the others (given n_train)."""
    held_out = config.n_validation + config.n_test
    n_train = config.n_train if config.n_train is not None else len(questions) - held_out
    if n_train < 1 or held_out + n_train > len(questions):
        test = f" + data.n_test ({config.n_test})" if config.n_test else ""
        wanted = f"{config.n_validation} + {config.n_train or 'at least 1'}"
        raise DataError(
            f"data.n_validation + data.n_train ({wanted}){test} exceed the "
            f"{len(questions)} questions of {where}: lower them"
        )
    # Sorted first so that the split depends on the ids only, not on the order of the file.
    ordered = sorted(questions, key=lambda q: q.id)
    random.Random(config.split_seed).shuffle(ordered)
    train_end = config.n_validation + n_train
    return (
        tuple(ordered[: config.n_validation]),
        tuple(ordered[config.n_validation : train_end]),
        tuple(ordered[train_end : train_end + config.n_test]),
    )


def _fingerprint(
    questions: Sequence[QARecord],
    corpus: Corpus,
    train: Sequence[QARecord],
    validation: Sequence[QARecord],
    test: Sequence[QARecord],
) -> str:
    digest = hashlib.sha256()
    if len(corpus) <= _HASHED_PASSAGES:
        for document in corpus.documents(corpus.id_order()):
            digest.update(json.dumps(["doc", document.id, document.title, document.text]).encode())
    else:  # identified by its files, hashed once per version of them: never row by row per trial
        digest.update(json.dumps(["corpus", corpus.fingerprint]).encode())
    for q in sorted(questions, key=lambda q: q.id):
        digest.update(json.dumps(["q", q.id, q.question, q.answers, q.gold_doc_ids]).encode())
    split = {"train": [q.id for q in train], "validation": [q.id for q in validation]}
    if test:  # without a test split, fingerprints stay those stored before there was one
        split["test"] = [q.id for q in test]
    digest.update(json.dumps(split).encode())
    return digest.hexdigest()
