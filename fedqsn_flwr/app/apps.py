"""Factories for the ServerApp and ClientApp (the root modules hold the instances)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedqsn_flwr.app.client import handle_evaluate, handle_query, handle_train
from fedqsn_flwr.app.config import resolve
from fedqsn_flwr.app.server import run_server


def make_server_app(project_dir: Path, overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is the run config plus ``overrides``.

    ``project_dir`` is where YAML presets (the ``config`` key) are looked up.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, resolve(context.run_config, project_dir, overrides))

    return app


def make_client_app(project_dir: Path, overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose config is the run config plus ``overrides``."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, resolve(context.run_config, project_dir, overrides))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        config = resolve(context.run_config, project_dir, overrides)
        return handle_evaluate(message, context, config)

    return app
