"""The client side: rebuild the proxy, train it, reply with the visible update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedqsn_flwr.app.base import Split
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.sources import data_key
from fedqsn_flwr.app.splits import client_data, input_spec
from fedqsn_flwr.app.training import evaluate, loss_gradient, perplexity, pick_device, train
from fedqsn_flwr.core.secret import derive_seed
from fedqsn_flwr.flower.client_helpers import freeze_hidden, load_received, train_reply
from fedqsn_flwr.flower.protocol import (
    HIDDEN_FEEDBACK_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    PARTITION_ROWS_KEY,
    SERVER_ROUND_KEY,
    TRAIN_LOSS_KEY,
)
from fedqsn_flwr.flower.proxy import encode_feedback


class NodeConfigError(ValueError):
    """A SuperNode started without a usable ``partition-id``/``num-partitions``."""


def partition_of(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config, checked."""
    node = context.node_config
    for key in ("partition-id", "num-partitions"):
        if key not in node:
            raise NodeConfigError(
                f"node config has no '{key}'; start the SuperNode with "
                '--node-config "partition-id=<i> num-partitions=<n>"'
            )
    partition_id, num_partitions = int(node["partition-id"]), int(node["num-partitions"])
    if not 0 <= partition_id < num_partitions:
        raise NodeConfigError(
            f"partition-id {partition_id} is out of range for num-partitions={num_partitions}"
        )
    return partition_id, num_partitions


def message_data(
    config: Mapping[str, Any], context: Context, settings: Mapping[str, Any]
) -> tuple[Split, Split]:
    """This node's (local train, local evaluation) splits.

    ``settings``: the message's config, which holds this partition's rows when
    the server cut the data set (:data:`PARTITION_ROWS_KEY`).
    """
    partition_id, num_partitions = partition_of(context)
    rows = settings.get(PARTITION_ROWS_KEY)
    if rows is not None and not isinstance(rows, list):
        raise ValueError(f"'{PARTITION_ROWS_KEY}' must be a list of row numbers")
    return client_data(config, partition_id, num_partitions, rows)


def _model(config: Mapping[str, Any]) -> torch.nn.Module:
    spec = input_spec(data_key(config))
    # no checkpoint weights: what a client trains comes in the proxy
    return build_model(config["model"], config["dropout"], spec=spec, pretrained=False).to(
        pick_device(config["device"])
    )


def handle_query(message: Message, context: Context) -> Message:
    """Tell the server this node's partition id (used for reproducible sampling)."""
    partition_id, num_partitions = partition_of(context)
    metrics = MetricRecord({PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: num_partitions})
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=message)


def handle_train(message: Message, context: Context, config: Mapping[str, Any]) -> Message:
    """Train the received proxy on the local split; reply with its update."""
    settings = message.content["config"]
    train_split, _ = message_data(config, context, settings)
    model = _model(config)
    # decoded straight into the model: no second dense copy of it on the client
    proxy = load_received(model, message.content)
    partition_id, _ = partition_of(context)
    # right before training: the first decode of a process starts numba's OpenMP
    # threads, which resets torch's thread count, and the first client would train
    # on more threads (other float sums than every later client: not reproducible)
    torch.set_num_threads(1)
    feedback = None
    if bool(settings.get(HIDDEN_FEEDBACK_KEY, False)) and proxy.unit_axes:
        # at the received proxy, before training: the gradient the server's control
        # variate is computed against
        feedback = encode_feedback(loss_gradient(model, None, train_split), proxy)
    with freeze_hidden(model, proxy):
        loss = train(
            model,
            train_split,
            epochs=int(settings.get("local-epochs", config["local-epochs"])),
            learning_rate=float(settings.get("learning-rate", config["learning-rate"])),
            batch_size=int(settings.get("batch-size", config["batch-size"])),
            seed=derive_seed(
                "client-training",
                config["seed"],
                int(settings.get(SERVER_ROUND_KEY, 0)),
                partition_id,
            ),
            proximal_mu=float(settings.get("proximal-mu", 0.0)),
            optimizer=str(settings.get("optimizer", config["optimizer"])),
        )
    return train_reply(
        message, model, proxy, len(train_split), {TRAIN_LOSS_KEY: loss}, feedback=feedback
    )


def handle_evaluate(message: Message, context: Context, config: Mapping[str, Any]) -> Message:
    """Evaluate the received proxy on the local evaluation split."""
    _, eval_split = message_data(config, context, message.content["config"])
    model = _model(config)
    load_received(model, message.content)
    torch.set_num_threads(1)  # after decoding (see handle_train)
    loss, accuracy = evaluate(model, eval_split)
    values = {NUM_EXAMPLES_KEY: len(eval_split), "loss": loss, "accuracy": accuracy}
    if eval_split.y.dim() == 2:  # token targets: a language model
        values["perplexity"] = perplexity(loss)
    metrics = MetricRecord(values)
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=message)
