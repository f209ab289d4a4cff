"""The ``ragsweep`` command line: the launch commands (``search.launch.cli``) and the query
commands (``search.query.cli``) on one typer app.

Every command catches :class:`RagsweepError` once, prints one line saying what is wrong and how to
fix it, and exits with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os

from search.cli_common import debug_requested

# transformers' GGUF conversion (SmolLM2, once per cache) draws a bare tqdm bar; tqdm reads this
# once, when something first imports it (Ray and the launch's own imports do, before any command
# body runs), so it is set before anything else is imported; --debug keeps the bars.
if not debug_requested():
    os.environ.setdefault("TQDM_DISABLE", "1")

import typer  # noqa: E402

from search.cli_common import error_console, print_error  # noqa: E402
from search.launch import cli as launch_cli  # noqa: E402
from search.query import cli as query_cli  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Hyperparameter search for fine-tuning RAG pipelines.",
)
app.add_typer(launch_cli.app)
app.add_typer(query_cli.app)


@app.callback()
def _root() -> None:
    """Hyperparameter search for fine-tuning RAG pipelines."""


def main() -> None:
    """Console-script entry point; a mistyped option gets one line too, not a usage box."""
    try:
        code = app(standalone_mode=False, prog_name="ragsweep")
    except typer.Abort:
        error_console.print("aborted")
        raise SystemExit(1) from None
    except typer.TyperException as e:  # click's usage errors: bad option values, unknown commands
        message = (e.format_message() if hasattr(e, "format_message") else str(e)).rstrip(".")
        context = getattr(e, "ctx", None)
        command = context.command_path if context is not None else "ragsweep"
        if message:  # empty when no arguments were given: the help was printed already
            print_error(f"{message}; see {command} --help")
        raise SystemExit(getattr(e, "exit_code", 2)) from None
    raise SystemExit(code if isinstance(code, int) else 0)
