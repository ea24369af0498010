"""fedqsn-flwr ServerApp: resolve the config, then run FedQSN (or FedAvg)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedqsn_flwr.config import resolve
from fedqsn_flwr.server import run_server

PROJECT_DIR = Path(__file__).resolve().parent


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is the run config plus ``overrides`` (tests, tools)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, resolve(context.run_config, PROJECT_DIR, overrides))

    return app


app = make_server_app()
