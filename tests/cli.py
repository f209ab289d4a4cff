"""``ragsweep`` commands for tests: in this process, or in a process of their own.

In this process a command costs what it does; a new interpreter spends seconds importing torch,
transformers and Ray before it. Tests that need what only a process of its own shows (signals,
what a command imports, every file Ray writes, what a fresh interpreter prints) use
:func:`ragsweep_process`.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Mapping
from unittest import mock

from search import cli_common
from search.cli import main

# What a subprocess with its output piped gets from rich: no terminal, so 80 columns.
_COLUMNS = 80


def ragsweep(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ragsweep ARGS`` as the console script does (``search.cli.main``), in this process,
    with ``env`` added to the environment; return the exit code, stdout and stderr a process
    would have given. An exception ``main`` lets through is printed with its traceback, as the
    interpreter would."""
    environment = {"HF_HUB_OFFLINE": "1"} | dict(env or {})
    stdout, stderr = io.StringIO(), io.StringIO()
    # The consoles are made once, at import; a process reads COLUMNS as it makes them.
    consoles = (cli_common.console, cli_common.error_console)
    widths = [console.width for console in consoles]
    code: int
    with (
        mock.patch.dict(os.environ, environment),
        mock.patch.object(sys, "argv", ["ragsweep", *args]),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        for console in consoles:
            console.width = int(environment.get("COLUMNS", _COLUMNS))
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            for console, width in zip(consoles, widths, strict=True):
                console.width = width
    return subprocess.CompletedProcess(
        ["ragsweep", *args], code, stdout.getvalue(), stderr.getvalue()
    )


def ragsweep_process(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``ragsweep ARGS`` in a new interpreter, with ``env`` added to the environment."""
    environment = os.environ | {"HF_HUB_OFFLINE": "1"} | dict(env or {})
    command = [sys.executable, "-c", "from search.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
