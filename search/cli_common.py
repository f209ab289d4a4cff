"""What every ``ragsweep`` command shares: the consoles, the one-line error contract, the options
both the launch and the query commands take, and the few environment variables they read.

Flags and environment variables are read in the command modules (``search.launch.cli``,
``search.query.cli``) and here, and nowhere else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from trainers.errors import ConfigError, RagsweepError, mask_secrets

__all__ = [
    "DebugOption",
    "SetOption",
    "StorageOption",
    "bad_choice",
    "cache_dir",
    "console",
    "debug_requested",
    "error_console",
    "one_line_errors",
    "print_error",
    "quiet_libraries",
    "storage_url",
]

console = Console()
error_console = Console(stderr=True)
_P = ParamSpec("_P")
_R = TypeVar("_R")

DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logs.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Change one spec field: a dotted KEY=VALUE, the value in YAML "
        "(search.joint=cartesian, 'methods=[rag_token]'). Repeatable.",
    ),
]
StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage URL (default: RAGSWEEP_STORAGE, else studies/<study>.db).",
    ),
]


def debug_requested() -> bool:
    """Whether ``--debug`` is on the command line, for what must be decided before typer parses
    it: progress bars are switched off before anything imports tqdm (see ``search.cli``)."""
    return "--debug" in sys.argv


def cache_dir() -> Path:
    """Where converted models and document vectors are cached: RAGSWEEP_CACHE, else ~/.cache."""
    return Path(os.environ.get("RAGSWEEP_CACHE", Path.home() / ".cache" / "ragsweep"))


def storage_url(explicit: str | None, spec_storage: str | None, default_file: Path) -> str:
    """The study database: --storage, else RAGSWEEP_STORAGE, else the spec's ``storage``, else
    a SQLite file (``<spec folder>/<name>.db`` for a launch, ``studies/<name>.db`` for queries)."""
    return (
        explicit
        or os.environ.get("RAGSWEEP_STORAGE")
        or spec_storage
        or f"sqlite:///{default_file.resolve()}"
    )


def one_line_errors(command: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``command``; a :class:`RagsweepError` becomes one ``error:`` line and exit code 2, or
    its traceback when the command's ``debug`` parameter is on."""

    @wraps(command)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return command(*args, **kwargs)
        except RagsweepError as e:
            if kwargs.get("debug"):
                raise
            print_error(str(e))
            raise typer.Exit(2) from None

    return wrapper


def print_error(message: str) -> None:
    """One ``error:`` line on stderr, with URL passwords masked."""
    # Escaped: messages quote user input such as [rag_token], which rich would read as markup.
    error_console.print(
        f"[bold red]error:[/] {escape(mask_secrets(message))}", highlight=False, soft_wrap=True
    )


def bad_choice(option: str, value: str, choices: tuple[str, ...]) -> RagsweepError:
    """The error for an option value that is not one of ``choices``."""
    return ConfigError(f"{option} '{value}' is not one of: {', '.join(choices)}")


def quiet_libraries(debug: bool) -> None:
    """Silence library progress bars and advice, which drown the one line a user needs
    (``--debug`` keeps them)."""
    if debug:
        return
    import logging
    import warnings

    import datasets
    import optuna
    import transformers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    datasets.disable_progress_bars()
    # Its loaders log a failure before raising it; the one error line says it already.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
