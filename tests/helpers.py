"""Test helpers: the library's in-process Grid, and a short in-process federation."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord

from fedqsn_flwr.app.base import Split
from fedqsn_flwr.app.config import validate
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.server import build_strategy, partition_config, train_config
from fedqsn_flwr.app.splits import load_client_data, load_server_data, partition_rows, server_data
from fedqsn_flwr.core.secret import from_text
from fedqsn_flwr.experiments.inprocess import InProcessGrid as LocalGrid
from fedqsn_flwr.experiments.inprocess import Tamper

#: The server secret of every test federation (reproducible masks, like a research run).
TEST_SECRET = from_text("tests")

__all__ = ["TEST_SECRET", "LocalGrid", "Tamper", "client_split", "rows_for", "run_local"]


def rows_for(config: dict[str, Any], secret: bytes = TEST_SECRET) -> Any:
    """A strategy's ``node_config_fn`` sending each client its rows, as the app's does."""
    return partition_config(config, server_data(config, secret), secret)


def client_split(
    dataset: Any,
    seed: int,
    test_fraction: float,
    pretrain_fraction: float,
    partition: int,
    num_partitions: int,
    partitioning: str = "iid",
    alpha: float = 0.5,
    secret: bytes = TEST_SECRET,
) -> tuple[Split, Split]:
    """A client's (train, local evaluation) splits, with the rows its server would send."""
    data = load_server_data(
        dataset,
        seed=seed,
        test_fraction=test_fraction,
        pretrain_fraction=pretrain_fraction,
        secret=secret,
    )
    rows = None
    if data.pool_rows is not None:
        cut = partition_rows(
            data,
            secret=secret,
            seed=seed,
            num_partitions=num_partitions,
            partitioning=partitioning,
            alpha=alpha,
        )
        rows = tuple(cut[partition].tolist())
    return load_client_data(
        dataset,
        seed=seed,
        partition_id=partition,
        num_partitions=num_partitions,
        partitioning=partitioning,
        alpha=alpha,
        rows=rows,
    )


def run_local(base_config: dict[str, Any], rounds: int = 2, **overrides: Any) -> tuple:
    """``rounds`` of the configured strategy on 3 in-process nodes.

    Returns ``(strategy, starting state, final state)``.
    """
    config = validate({**base_config, "fraction-evaluate": 0.0, "min-nodes": 3, **overrides})
    torch.manual_seed(0)
    model = build_model("cnn")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = build_strategy(config, model, None, server_secret=TEST_SECRET)
    result = strategy.start(
        LocalGrid(3, config),
        ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        train_config=train_config(config),
    )
    return strategy, start, result.arrays.to_torch_state_dict()
