import os

import pytest
from flwr.supercore.task_identity import TaskIdentity

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's Message() needs a run/node/task identity, as in a ServerApp process."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture
def base_config(tmp_path):
    from fedqsn_flwr.app.config import DEFAULTS, validate

    return validate(
        {
            **DEFAULTS,
            "output-dir": str(tmp_path),
            "pretrain-epochs": 5,
            "local-epochs": 1,
            "seed": 7,
        }
    )


@pytest.fixture(scope="session")
def saved_run(tmp_path_factory):
    """One real simulation in the default secret mode, every message saved.

    Shared by the tests that read a finished run from a client's side
    (test_secret) and attack it (test_attacks): one Ray start, not two.
    """
    from fedqsn_flwr.experiments.simulation import simulate

    return simulate(
        {
            "output-dir": str(tmp_path_factory.mktemp("saved-run")),
            "run-name": "secret",
            "num-server-rounds": 2,
            "pretrain-epochs": 1,
            "local-epochs": 1,
            "server-mask-ratio": 0.5,
            "fraction-evaluate": 1.0,
            "seed": 11,
        },
        num_nodes=2,
    )


def pytest_collection_modifyitems(config, items):
    """Slow tests first: with two workers the quick ones then fill the gaps at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
