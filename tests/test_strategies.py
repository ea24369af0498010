"""The strategy family: fedavg, fedprox, fedq, fedsn, fedqsn built from the config."""

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedqsn_flwr.app.config import validate
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.server import build_strategy, train_config
from fedqsn_flwr.flower.protocol import (
    PROXY_RECORD,
)
from fedqsn_flwr.flower.strategies import FedQSN, MeasuredFedAvg
from tests.helpers import TEST_SECRET, LocalGrid, run_local


def _run(base_config, **overrides):
    strategy, _, final = run_local(base_config, 2, **overrides)
    return strategy, final


def test_fedavg_equals_fedsn_without_masks_within_float_tolerance(base_config):
    """FedAvg averages weights; FedQSN adds the averaged update: equal up to rounding."""
    _, fedavg = _run(base_config, strategy="fedavg")
    # float32 updates: the comparison is about the aggregation, not the uplink's rounding
    _, fedsn = _run(
        base_config,
        **{
            "strategy": "fedsn",
            "server-mask-ratio": 0.0,
            "client-mask-ratio": 0.0,
            "update-bit-width": 32,
        },
    )
    for name in fedavg:
        assert torch.allclose(fedavg[name], fedsn[name], atol=1e-5, rtol=1e-4), name


def test_strategy_names_build_the_right_proxies(base_config):
    config = validate({**base_config, "min-nodes": 2})
    model = build_model("cnn")
    grid = LocalGrid(2, config)
    arrays = ArrayRecord(model.state_dict())
    kinds = {}
    for name in ("fedavg", "fedprox", "fedq", "fedsn", "fedqsn"):
        strategy = build_strategy(
            {**config, "strategy": name}, model, None, server_secret=TEST_SECRET
        )
        message = next(
            iter(
                strategy.configure_train(
                    1, arrays, train_config({**config, "strategy": name}), grid
                )
            )
        )
        keys = (
            set(message.content[PROXY_RECORD].keys()) if PROXY_RECORD in message.content else set()
        )
        kinds[name] = (
            type(strategy),
            any(k.endswith("/codes") for k in keys),
            any(k.endswith("/units") for k in keys),
            "proximal-mu" in message.content["config"],
        )
    assert kinds["fedavg"] == (MeasuredFedAvg, False, False, False)
    assert kinds["fedprox"] == (MeasuredFedAvg, False, False, True)
    assert kinds["fedq"] == (FedQSN, True, False, False)
    assert kinds["fedsn"] == (FedQSN, False, True, False)
    assert kinds["fedqsn"] == (FedQSN, True, True, False)


def test_fedprox_term_keeps_clients_closer_to_the_global_model(base_config):
    _, fedavg = _run(base_config, strategy="fedavg", **{"local-epochs": 3})
    _, fedprox = _run(base_config, strategy="fedprox", **{"local-epochs": 3, "proximal-mu": 5.0})
    torch.manual_seed(0)
    start = build_model("cnn").state_dict()
    drift = lambda state: sum((state[n] - start[n]).pow(2).sum() for n in start)  # noqa: E731
    assert drift(fedprox) < drift(fedavg)


def test_fedq_quantizes_everything_and_masks_nothing(base_config):
    strategy, _ = _run(base_config, strategy="fedq")
    assert not strategy.policy.unit_axes and strategy.bit_width == 4
    assert strategy.server_mask == {}


def test_fedavg_keeps_integer_buffers_integer_across_rounds(base_config):
    """Flower averages BatchNorm's int64 counter into float64; the next round must still fit."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedqsn_flwr.flower.strategies import MeasuredFedAvg

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    strategy = MeasuredFedAvg(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)

    class EchoGrid:
        def get_node_ids(self):
            return [11, 22]

        def send_and_receive(self, messages, timeout=None):
            replies = []
            for message in messages:
                if message.metadata.message_type != "train":
                    continue
                arrays = ArrayRecord(
                    {
                        k: Array(np.asarray(v.numpy() + (1 if v.numpy().dtype.kind == "f" else 2)))
                        for k, v in message.content["arrays"].items()
                    }
                )
                metrics = MetricRecord({"num-examples": 5})
                replies.append(
                    Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)
                )
            return replies

    grid = EchoGrid()
    arrays = ArrayRecord(model.state_dict())
    for server_round in (1, 2, 3):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        assert strategy.round_log[server_round]["num_aggregated"] == 2
    counter = arrays["1.num_batches_tracked"].numpy()
    assert counter.dtype == np.int64 and counter.shape == () and int(counter) == 6


def test_message_bytes_is_the_serialized_size_without_serializing(monkeypatch):
    """Sizes computed from a hollow message equal the serialized ones, at every varint step."""
    from flwr.app import Array, ConfigRecord, Error, Message, MetricRecord, RecordDict
    from flwr.common.serde import message_to_proto

    from fedqsn_flwr.flower.strategies import utils

    monkeypatch.setattr(utils, "_SERIALIZE_BELOW", 0)  # the computed size, however small
    # array sizes around the lengths where a length prefix (at any nesting level) grows
    sizes = [0, 1, 90, 127, 128, 200, 16_300, 16_383, 16_384, 70_000, 2**21 - 60, 2**21 + 5]
    messages = []
    for size in sizes:
        arrays = ArrayRecord(
            {"a": Array(np.zeros(size, np.uint8)), "b": Array(np.ones((3, 4), np.float16))}
        )
        content = RecordDict(
            {
                "proxy": arrays,
                "config": ConfigRecord({"x": 1, "s": "abc"}),
                "metrics": MetricRecord({"n": 3.5}),
                "empty": ArrayRecord(),
            }
        )
        sent = Message(content=content, message_type="train", dst_node_id=5)
        messages += [sent, Message(RecordDict({"update": arrays}), reply_to=sent)]
        messages.append(Message(Error(code=1, reason="failed"), reply_to=sent))
    for message in messages:
        assert utils.message_bytes(message) == message_to_proto(message).ByteSize()
