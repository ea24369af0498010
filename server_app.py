"""fedqsn-flwr ServerApp: resolve the config, then run FedQSN (or FedAvg)."""

from pathlib import Path

from fedqsn_flwr.app.apps import make_server_app

app = make_server_app(Path(__file__).resolve().parent)
