"""Client faults in a real Flower simulation."""

import re
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedqsn_flwr.app.apps import make_server_app
from fedqsn_flwr.app.client import handle_query, handle_train
from fedqsn_flwr.app.config import resolve
from fedqsn_flwr.app.results import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _client_app_failing_on(partition: int, overrides: dict) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == partition:
            raise RuntimeError("simulated client crash")
        return handle_train(message, context, resolve({}, ROOT, overrides))

    return app


@pytest.mark.slow
def test_a_clientapp_that_raises_is_excluded_and_the_run_finishes(tmp_path, caplog):
    overrides = {
        "output-dir": str(tmp_path),
        "run-name": "faulty",
        "num-server-rounds": 2,
        "min-nodes": 3,
        "pretrain-epochs": 5,
        "fraction-evaluate": 0.0,
    }
    run_simulation(
        make_server_app(ROOT, overrides),
        _client_app_failing_on(1, overrides),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    rows = read_metrics(tmp_path / "faulty" / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["num_sampled"] == 3 and row["num_aggregated"] == 2
        assert row["num_failures"] == 1
    assert rows[-1]["global_accuracy"] > 0.5
    failures = [r.getMessage() for r in caplog.records if "failed and is skipped" in r.getMessage()]
    assert len(failures) == 2  # one per round, each naming the node
    assert all(re.match(r"Round \d: node \d+ failed", f) for f in failures)
