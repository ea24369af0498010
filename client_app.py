"""fedqsn-flwr ClientApp: train the received proxy and return its update."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedqsn_flwr.client import handle_evaluate, handle_query, handle_train
from fedqsn_flwr.config import resolve

PROJECT_DIR = Path(__file__).resolve().parent


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose config is the run config plus ``overrides`` (tests, tools)."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, resolve(context.run_config, PROJECT_DIR, overrides))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle_evaluate(
            message, context, resolve(context.run_config, PROJECT_DIR, overrides)
        )

    return app


app = make_client_app()
