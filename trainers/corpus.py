"""The retrieval corpus as an Arrow table read on demand, never every passage as a Python object.

A corpus file (JSONL or Parquet) or a hub corpus is read through Hugging Face ``datasets``, which
converts it once into Arrow files in its cache and memory-maps them: a trial reads the rows it
uses (its top-k passages, the gold passages it trains on) and the OS shares the pages between the
trials on a node. What a trial would otherwise recompute over every row (the checks, a fingerprint
of the content, the sorted ids that find a passage's row) is computed once per version of the
source files, kept in a manifest under the ``datasets`` cache, and memory-mapped too. Corpora
derived from the questions (generated, PopQA/HotPotQA paragraphs) are small Arrow tables in memory
behind the same interface.

A passage's position is its row: the order of the source, which the index keeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow
import pyarrow.compute as pc

from trainers.config import CorpusColumns
from trainers.errors import DataError, one_line

__all__ = ["Corpus", "Document", "check_utf8"]

# Bumped when what a manifest holds changes: older manifests are then rebuilt, not misread.
_MANIFEST_FORMAT = 1
# Rows converted to Python at a time while a manifest is built (ids) or a corpus is streamed.
_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class Document:
    """One retrievable passage."""

    id: str
    title: str
    text: str


class Corpus:
    """Passages in a fixed order, read by position; a passage's position is its row in the index.

    ``fingerprint`` identifies the content in that order: the sha256 of the source files' bytes
    (and of the column mapping) for a file or hub corpus, of every passage for one in memory.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        *,
        columns: CorpusColumns,
        where: str,
        fingerprint: str,
        ids: np.ndarray,
        id_order: np.ndarray,
    ) -> None:
        self._dataset = dataset
        self._columns = columns
        self.where = where  # how messages name the corpus, e.g. "data.corpus_path 'c.jsonl'"
        self.fingerprint = fingerprint
        # (N,) UTF-8 ids as fixed-width bytes, in row order, and (N,) the rows in id order:
        # memory maps of the manifest for a file or hub corpus. numpy's searchsorted finds an id
        # in log N probes of these, where a dict of 30M ids would hold gigabytes in every trial.
        self._ids = ids
        self._id_order = id_order

    @classmethod
    def from_documents(cls, documents: Iterable[Document], *, where: str) -> Corpus:
        """A corpus held in memory, for passages derived from the questions."""
        listed = list(documents)
        dataset = datasets.Dataset.from_dict(
            {
                "id": [d.id for d in listed],
                "title": [d.title for d in listed],
                "text": [d.text for d in listed],
            },
            features=datasets.Features({name: datasets.Value("string") for name in _CANONICAL}),
        )
        return cls.from_dataset(dataset, columns=CorpusColumns(), where=where, source_files=None)

    @classmethod
    def from_dataset(
        cls,
        dataset: datasets.Dataset,
        *,
        columns: CorpusColumns,
        where: str,
        source_files: Sequence[Path] | None,
    ) -> Corpus:
        """``dataset``'s passages, its columns named by ``columns``.

        ``source_files`` are the files whose bytes identify the content (a corpus file; a hub
        corpus' Arrow files): its checks, fingerprint and id index are computed once per version
        of them (path, size, modification time) and read from the manifest after that. None:
        a small corpus in memory, checked and hashed row by row each time.
        """
        missing = [name for name in _named(columns) if name not in dataset.column_names]
        if missing:
            raise DataError(
                f"{where} lacks the column(s) {', '.join(missing)}: add them, or name its "
                "columns in data.corpus_columns (id, title, text)"
            )
        dataset = dataset.select_columns(_named(columns))
        if source_files is None:
            _check_rows(dataset, columns, where)
            ids, id_order = _id_index(dataset.data.column(columns.id), where)
            fingerprint = _rows_digest(dataset, columns)
        else:
            fingerprint, ids, id_order = _manifest(dataset, columns, where, source_files)
        return cls(
            dataset,
            columns=columns,
            where=where,
            fingerprint=fingerprint,
            ids=ids,
            id_order=id_order,
        )

    def __len__(self) -> int:
        return len(self._dataset)

    def documents(self, positions: Sequence[int] | np.ndarray) -> list[Document]:
        """The passages at ``positions`` (1-D), in that order: only those rows are read."""
        wanted = np.asarray(positions, dtype=np.int64).reshape(-1).tolist()
        if not wanted:
            return []
        return self._documents(self._dataset[wanted])

    def batches(
        self, size: int, *, start: int = 0, stop: int | None = None
    ) -> Iterator[list[Document]]:
        """The passages of rows ``start`` to ``stop`` (default: all) in order, ``size`` at a
        time: what an encoder streams, one shard of a corpus being such a range."""
        stop = len(self) if stop is None else min(stop, len(self))
        for begin in range(start, stop, size):
            yield self._documents(self._dataset[begin : min(begin + size, stop)])

    def lookup(self, doc_ids: Sequence[str]) -> np.ndarray:
        """The position of each of ``doc_ids`` (N,), -1 where the corpus has no such id."""
        width = self._ids.dtype.itemsize
        encoded = [doc_id.encode() for doc_id in doc_ids]
        fits = np.array([len(key) <= width for key in encoded], dtype=bool)
        keys = np.array(
            [key if len(key) <= width else b"" for key in encoded], dtype=self._ids.dtype
        )
        if not len(self) or not len(keys):
            return np.full(len(keys), -1, dtype=np.int64)
        slots = np.searchsorted(self._ids, keys, sorter=self._id_order)
        rows = np.asarray(self._id_order[np.minimum(slots, len(self) - 1)], dtype=np.int64)
        found = fits & (np.asarray(self._ids[rows]) == keys)
        return np.where(found, rows, -1)

    def positions(self, doc_ids: Sequence[str]) -> np.ndarray:
        """The position of each of ``doc_ids`` (N,); a ``DataError`` names the first unknown."""
        rows = self.lookup(doc_ids)
        unknown = np.flatnonzero(rows < 0)
        if unknown.size:
            raise DataError(
                f"{self.where} has no document '{doc_ids[int(unknown[0])]}': fix the id, or "
                "use the corpus it comes from"
            )
        return rows

    def id_order(self) -> np.ndarray:
        """The positions of the passages sorted by id (N,)."""
        return np.asarray(self._id_order)

    def titled(self, titles: Iterable[str]) -> dict[str, list[str]]:
        """The ids of the passages titled each of ``titles`` (in corpus order); titles no
        passage has are left out. One pass over the title column, in Arrow."""
        wanted = sorted(set(titles))
        if self._columns.title is None or not wanted:
            return {}
        column = pc.cast(self._dataset.data.column(self._columns.title), pyarrow.string())
        mask = pc.is_in(column, value_set=pyarrow.array(wanted, pyarrow.string()))
        rows = np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))
        if not rows.size:
            return {}
        # Ids and titles only: a title of a chunked Wikipedia names many passages, whose text
        # nothing here needs.
        names = [self._columns.id, self._columns.title]
        found = self._dataset.select_columns(names)[rows.tolist()]
        by_title: dict[str, list[str]] = {}
        for doc_id, title in zip(found[names[0]], found[names[1]], strict=True):
            by_title.setdefault(str(title), []).append(str(doc_id))
        return by_title

    def _documents(self, rows: dict[str, list[Any]]) -> list[Document]:
        columns = self._columns
        ids, texts = rows[columns.id], rows[columns.text]
        titles = rows[columns.title] if columns.title is not None else [""] * len(ids)
        return [
            Document(id=str(doc_id), title=str(title or ""), text=text)
            for doc_id, title, text in zip(ids, titles, texts, strict=True)
        ]


_CANONICAL = ("id", "title", "text")


def _named(columns: CorpusColumns) -> list[str]:
    return [name for name in (columns.id, columns.title, columns.text) if name is not None]


# --- checks and the id index -------------------------------------------------------------------


def _check_rows(dataset: datasets.Dataset, columns: CorpusColumns, where: str) -> None:
    """Every passage has an id and non-blank text; ids are text or integers (``str()`` of them
    is the id), text is text. In Arrow, over the whole columns at once."""
    table = dataset.data
    id_type, text_type = table.schema.field(columns.id).type, table.schema.field(columns.text).type
    if not (_is_text(id_type) or pyarrow.types.is_integer(id_type)):
        raise DataError(
            f"{where}: column '{columns.id}' holds {id_type}, not text or integers: "
            "fix the ids or name another column in data.corpus_columns.id"
        )
    if not _is_text(text_type):
        raise DataError(
            f"{where}: column '{columns.text}' holds {text_type}, not text: fix the column or "
            "name another one in data.corpus_columns.text"
        )
    text = table.column(columns.text)
    blank = pc.or_kleene(
        pc.is_null(table.column(columns.id)),
        pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), True),
    )
    bad = np.flatnonzero(blank.to_numpy(zero_copy_only=False))
    if bad.size:
        doc_id = table.column(columns.id)[int(bad[0])].as_py()
        raise DataError(f"{where}: document {doc_id!r} has no id or empty text: fix the row")


def _is_text(kind: pyarrow.DataType) -> bool:
    return bool(pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind))


def _id_index(id_column: pyarrow.ChunkedArray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids as fixed-width UTF-8 bytes in row order (N,), rows in id order (N,)); refuses an id
    seen twice."""
    as_bytes = pc.cast(pc.cast(id_column, pyarrow.string()), pyarrow.binary())
    width = max(1, int(pc.max(pc.binary_length(as_bytes)).as_py() or 0))
    ids = np.empty(len(as_bytes), dtype=f"S{width}")
    for start in range(0, len(as_bytes), _CHUNK_ROWS):
        chunk = as_bytes.slice(start, _CHUNK_ROWS).to_pylist()
        ids[start : start + len(chunk)] = chunk
    id_order = np.argsort(ids, kind="stable")
    in_order = ids[id_order]
    repeated = np.flatnonzero(in_order[1:] == in_order[:-1])
    if repeated.size:
        doc_id = bytes(in_order[int(repeated[0])]).decode()
        raise DataError(f"{where} has document id '{doc_id}' twice: make document ids unique")
    return ids, id_order


# --- fingerprints --------------------------------------------------------------------------------


def _rows_digest(dataset: datasets.Dataset, columns: CorpusColumns) -> str:
    """The sha256 of every passage in order, as the index cache was keyed before corpora had
    manifests (so vectors cached then are found again)."""
    digest = hashlib.sha256()
    corpus_rows = dataset.iter(batch_size=_CHUNK_ROWS)
    for rows in corpus_rows:
        ids, texts = rows[columns.id], rows[columns.text]
        titles = rows[columns.title] if columns.title is not None else [""] * len(ids)
        for doc_id, title, text in zip(ids, titles, texts, strict=True):
            digest.update(json.dumps([str(doc_id), str(title or ""), text]).encode())
    return digest.hexdigest()


def _files_digest(files: Sequence[Path], columns: CorpusColumns) -> str:
    """The sha256 of the files' bytes (at disk speed, in C) and of which columns are read."""
    digest = hashlib.sha256(json.dumps(columns.model_dump(mode="json")).encode())
    for file in files:
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


# --- the manifest --------------------------------------------------------------------------------


def _manifest_root() -> Path:
    # Beside the Arrow files datasets converted the corpus into (HF_DATASETS_CACHE).
    return Path(datasets.config.HF_DATASETS_CACHE) / "ragsweep-corpora"


def _manifest_key(files: Sequence[Path], columns: CorpusColumns) -> str:
    """Which version of the files (and columns) a manifest describes: a changed file has a new
    size or modification time, and so a manifest of its own."""
    identity = []
    for file in files:
        stat = file.stat()
        identity.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    key = {"format": _MANIFEST_FORMAT, "files": identity, "columns": columns.model_dump()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _manifest(
    dataset: datasets.Dataset, columns: CorpusColumns, where: str, files: Sequence[Path]
) -> tuple[str, np.ndarray, np.ndarray]:
    """(fingerprint, ids, id order) of a file or hub corpus: read from its manifest, or computed
    and written there once (the rows checked, the files hashed, the ids indexed)."""
    folder = _manifest_root() / _manifest_key(files, columns)
    read = _read_manifest(folder, len(dataset))
    if read is not None:
        return read
    check_utf8(dataset, where)
    _check_rows(dataset, columns, where)
    ids, id_order = _id_index(dataset.data.column(columns.id), where)
    fingerprint = _files_digest(files, columns)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(
            tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".tmp")
        )
    except OSError as e:
        raise _unwritable(folder, e) from e
    try:
        # Through write(), not a memory map: a full disk is then an OSError, not a SIGBUS.
        np.save(building / "ids.npy", ids, allow_pickle=False)
        np.save(building / "order.npy", id_order, allow_pickle=False)
        manifest = {"format": _MANIFEST_FORMAT, "rows": len(dataset), "fingerprint": fingerprint}
        (building / "manifest.json").write_text(json.dumps(manifest))
        try:
            os.rename(building, folder)  # atomic: a manifest is whole or absent
        except OSError:
            if not (folder / "manifest.json").exists():
                raise
            # Another trial wrote the same manifest first: both are the same, read theirs.
    except OSError as e:
        raise _unwritable(folder, e) from e
    finally:
        shutil.rmtree(building, ignore_errors=True)
    read = _read_manifest(folder, len(dataset))
    if read is None:  # just written and renamed: unreadable now means the disk failed
        raise DataError(f"cannot read the corpus manifest {folder}; delete it to rebuild it")
    return read


def _unwritable(folder: Path, error: OSError) -> DataError:
    return DataError(
        f"cannot write the corpus manifest {folder.parent}: {one_line(error)}; free space there "
        "or point HF_DATASETS_CACHE at a larger disk"
    )


def _read_manifest(folder: Path, rows: int) -> tuple[str, np.ndarray, np.ndarray] | None:
    """The manifest in ``folder``, None when there is none or it does not match ``rows``."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != _MANIFEST_FORMAT or manifest.get("rows") != rows:
            return None
        ids = np.load(folder / "ids.npy", mmap_mode="r", allow_pickle=False)
        id_order = np.load(folder / "order.npy", mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(
            f"cannot read the corpus manifest {folder}: {one_line(e)}; delete it to rebuild it"
        ) from e
    return str(manifest["fingerprint"]), ids, id_order


def check_utf8(dataset: datasets.Dataset, where: str) -> None:
    """Refuse a table whose text is not valid UTF-8, naming ``where`` it comes from."""
    try:
        # Arrow keeps text as it found it and fails only when a row is read; a full validation
        # finds bytes that are not UTF-8 now, in C++, before any row is used.
        dataset.data.table.validate(full=True)
    except pyarrow.ArrowInvalid as e:
        raise DataError(f"{where} is not UTF-8 text ({one_line(e)}): save it as UTF-8") from e
