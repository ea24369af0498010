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
