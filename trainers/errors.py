"""The one exception tree of ragsweep.

Every error a user can cause derives from :class:`RagsweepError`; its message is one line that
names the problem and the fix. The CLI catches it once, prints the line and exits with code 2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

__all__ = [
    "ConfigError",
    "DataError",
    "ModelError",
    "RagsweepError",
    "TrainingError",
    "causes",
    "mask_secrets",
    "one_line",
    "or_list",
]


class RagsweepError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ConfigError(RagsweepError):
    """A spec or configuration value is invalid."""


class DataError(RagsweepError):
    """A dataset cannot be found, read or used as configured."""


class ModelError(RagsweepError):
    """A model cannot be found, loaded or configured as asked."""


class TrainingError(RagsweepError):
    """Training diverged (NaN or infinite loss) or cannot proceed."""


# scheme://user:password@host: the password runs to the last "@" of the word, since an unquoted
# one may hold "@" itself.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):\S+@")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def one_line(error: BaseException) -> str:
    """A foreign error's type and first non-empty line, short enough for a one-line message,
    with URL passwords masked."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0][:200].rstrip(".") if lines else "no message"
    return f"{type(error).__name__}: {mask_secrets(text)}"


def causes(error: BaseException, depth: int = 8) -> Iterator[BaseException]:
    """``error``, then what it was raised from or during, and so on (``depth`` at most): libraries
    wrap one another's errors (Optuna wraps SQLAlchemy, which wraps the driver)."""
    seen: BaseException | None = error
    for _ in range(depth):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def or_list(names: Sequence[str]) -> str:
    """``a, b or c``: the choices a message offers."""
    if len(names) < 2:
        return "".join(names) or "none"
    return f"{', '.join(names[:-1])} or {names[-1]}"
