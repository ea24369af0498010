"""fedqsn-flwr ClientApp: train the received proxy and return its update."""

from pathlib import Path

from fedqsn_flwr.app.apps import make_client_app

app = make_client_app(Path(__file__).resolve().parent)
