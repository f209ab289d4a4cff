"""``ragsweep dashboard``: optuna-dashboard serving a study database, with its URL masked."""

from __future__ import annotations

from rich.markup import escape

from search.cli_common import console
from search.store import mask_url, open_database, open_storage
from trainers import ConfigError

__all__ = ["serve"]


def serve(url: str, *, host: str, port: int) -> None:
    """Serve the database at ``url`` on ``host``:``port`` until Ctrl-C."""
    try:
        from optuna_dashboard import run_server
    except ImportError as e:
        raise ConfigError(
            "optuna-dashboard is not installed; pip install 'ragsweep[dashboard]'"
        ) from e
    # Read first, as every query does: Optuna's storage would add its tables to a file that has
    # none (an empty file, another program's database) rather than refuse it.
    open_database(url).studies()
    opened = open_storage(url, create=False)
    console.print(
        escape(f"optuna-dashboard for {mask_url(url)} on http://{host}:{port} (Ctrl-C stops it)"),
        highlight=False,
    )
    run_server(opened, host=host, port=port)
