"""Per-question results stored with a trial: each validation question's prediction, EM, F1,
gold-passage recall and retrieved ids (:class:`trainers.evaluate.QuestionResult`).

One attribute per trial, the results' canonical JSON gzip-compressed and base64-encoded (a few
kilobytes for a hundred questions): in the study's database, so every machine that can query
the study can read them, PostgreSQL or SQLite, and nothing beside it can be moved or lost. The
trial's record keeps the JSON's SHA-256; a read that does not match it reads as not stored.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import zlib
from collections.abc import Sequence

from trainers import QuestionResult, questions_json

__all__ = ["decode_questions", "encode_questions"]


def encode_questions(questions: Sequence[QuestionResult]) -> str:
    """``questions`` as the text the trial's ``per_question`` attribute stores."""
    packed = gzip.compress(questions_json(questions).encode(), mtime=0)
    return base64.b64encode(packed).decode("ascii")


def decode_questions(text: str, sha256: str | None) -> tuple[QuestionResult, ...] | None:
    """The results an :func:`encode_questions` text holds, or None when it cannot be read or
    its JSON's hash is not ``sha256`` (the one the trial's record keeps)."""
    try:
        unpacked = gzip.decompress(base64.b64decode(text, validate=True))
    except (binascii.Error, OSError, EOFError, zlib.error, ValueError):
        return None
    if sha256 is not None and hashlib.sha256(unpacked).hexdigest() != sha256:
        return None
    try:
        rows = json.loads(unpacked)
        return tuple(QuestionResult(**row | {"retrieved": tuple(row["retrieved"])}) for row in rows)
    except (TypeError, KeyError, ValueError):
        return None
