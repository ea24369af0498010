"""Hostile replies of issue 13: each is skipped with a log line, and the round goes on."""

import io
import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedqsn_flwr.app.config import validate
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.server import build_strategy, train_config
from fedqsn_flwr.flower.protocol import (
    METRICS_RECORD,
    UPDATE_RECORD,
)
from tests.helpers import TEST_SECRET, LocalGrid, rows_for


def _strategy(base_config, name="fedqsn", nodes=3, **extra):
    config = validate(
        {
            **base_config,
            "strategy": name,
            "fraction-evaluate": 1.0,
            "min-nodes": nodes,
            "server-mask-ratio": 0.3,
            **extra,
        }
    )
    torch.manual_seed(0)
    model = build_model("cnn")
    strategy = build_strategy(config, model, None, server_secret=TEST_SECRET)
    return strategy, model.state_dict(), config


def _npy(values):
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _raw_array(dtype, shape, data, stype="numpy.ndarray"):
    array = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data or b"x")
    array.data = data  # Flower's constructor refuses an empty buffer; a wire message may not
    return array


def _with_arrays(reply, origin, key, change):
    record = reply.content[key]
    arrays = {k: record[k] for k in record.keys()}
    change(arrays)
    content = RecordDict({key: ArrayRecord(arrays), METRICS_RECORD: reply.content[METRICS_RECORD]})
    return Message(content, reply_to=origin)


def _train_round(strategy, state, grid, config):
    messages = list(strategy.configure_train(1, ArrayRecord(state), train_config(config), grid))
    origins = {m.metadata.dst_node_id: m for m in messages}
    return messages, origins, grid.send_and_receive(messages)


def _first_tensor(record):
    return next(k for k in record.keys() if k.endswith("weight"))


BAD_ARRAYS = {
    "short buffer": lambda a, k: a.update(
        {k: _raw_array(a[k].dtype, a[k].shape, a[k].data[: len(a[k].data) // 2])}
    ),
    "empty buffer": lambda a, k: a.update({k: _raw_array(a[k].dtype, a[k].shape, b"")}),
    "other stype": lambda a, k: a.update(
        {k: _raw_array(a[k].dtype, a[k].shape, a[k].data, stype="torch.Tensor")}
    ),
    "more columns than declared": lambda a, k: a.update(
        {
            k: _raw_array(
                a[k].dtype,
                a[k].shape,
                _npy(np.zeros((a[k].shape[0], a[k].shape[1] * 2, *a[k].shape[2:]), a[k].dtype)),
            )
        }
    ),
    "one scalar declared as a tensor": lambda a, k: a.update(
        {k: _raw_array(a[k].dtype, a[k].shape, _npy(np.array(1.0, a[k].dtype)))}
    ),
    "garbage dtype": lambda a, k: a.update({k: _raw_array("no-such-dtype", a[k].shape, a[k].data)}),
    "NaN": lambda a, k: a.update(
        {k: Array(np.full(a[k].shape, np.nan, dtype=np.dtype(a[k].dtype)))}
    ),
}


@pytest.mark.parametrize("strategy_name", ["fedqsn", "fedq", "fedsn", "fedavg"])
@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_a_malformed_train_reply_is_skipped_for_every_strategy(
    base_config, caplog, strategy_name, case
):
    strategy, state, config = _strategy(base_config, strategy_name)
    grid = LocalGrid(3, config)
    _, origins, replies = _train_round(strategy, state, grid, config)
    key = UPDATE_RECORD if UPDATE_RECORD in replies[0].content.array_records else "arrays"
    bad = replies[1]
    tensor = _first_tensor(bad.content[key])
    replies[1] = _with_arrays(
        bad, origins[bad.metadata.src_node_id], key, lambda a: BAD_ARRAYS[case](a, tensor)
    )
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None  # the other two replies were aggregated
    assert strategy.round_log[1]["num_aggregated"] == 2
    assert f"rejected reply from node {bad.metadata.src_node_id}" in caplog.text


@pytest.mark.parametrize("strategy_name", ["fedqsn", "fedavg"])
@pytest.mark.parametrize("examples", [float("nan"), -3, 0, float("inf"), [3, 4], 10**12], ids=repr)
def test_bad_example_counts_are_skipped(base_config, strategy_name, examples):
    strategy, state, config = _strategy(base_config, strategy_name)
    grid = LocalGrid(3, config)
    _, origins, replies = _train_round(strategy, state, grid, config)
    bad = replies[0]
    metrics = MetricRecord({**dict(bad.content[METRICS_RECORD]), "num-examples": examples})
    key = next(iter(bad.content.array_records))
    replies[0] = Message(
        RecordDict({key: bad.content[key], METRICS_RECORD: metrics}),
        reply_to=origins[bad.metadata.src_node_id],
    )
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.round_log[1]["num_aggregated"] == 2


def test_a_second_reply_of_a_node_and_replies_of_unsampled_nodes_are_skipped(base_config, caplog):
    strategy, state, config = _strategy(base_config, "fedqsn")
    grid = LocalGrid(3, config)
    _, origins, replies = _train_round(strategy, state, grid, config)
    duplicate = Message(replies[0].content, reply_to=origins[replies[0].metadata.src_node_id])
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, [*replies, duplicate])
    assert strategy.round_log[1]["num_aggregated"] == 3
    assert "a second reply (the first counts)" in caplog.text


def _evaluate_replies(strategy, state, grid):
    messages = list(strategy.configure_evaluate(1, ArrayRecord(state), ConfigRecord(), grid))
    origins = {m.metadata.dst_node_id: m for m in messages}
    return origins, grid.send_and_receive(messages)


def _metrics_reply(reply, origin, metrics):
    return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=origin)


@pytest.mark.parametrize("strategy_name", ["fedqsn", "fedavg"])
def test_bad_evaluate_replies_are_skipped_and_no_examples_means_missing(
    base_config, caplog, strategy_name
):
    strategy, state, config = _strategy(base_config, strategy_name)
    grid = LocalGrid(3, config)
    strategy.configure_train(1, ArrayRecord(state), train_config(config), grid)
    origins, replies = _evaluate_replies(strategy, state, grid)
    good = dict(replies[0].content[METRICS_RECORD])
    n0 = replies[0].metadata.src_node_id
    n1 = replies[1].metadata.src_node_id
    n2 = replies[2].metadata.src_node_id
    hostile = [
        replies[0],
        _metrics_reply(replies[1], origins[n1], {**good, "extra": 1.0}),
        _metrics_reply(replies[2], origins[n2], {**good, "accuracy": 1e30}),
    ]
    with caplog.at_level(logging.WARNING):
        metrics = strategy.aggregate_evaluate(1, hostile)
    assert metrics["accuracy"] == pytest.approx(good["accuracy"])  # 1e30 is not counted
    assert caplog.text.count("rejected reply") == 1  # the out-of-range accuracy only
    # an extra metric is aggregated over nobody: keys all replies share, no reply lost
    assert "extra" not in metrics and set(metrics) == {"loss", "accuracy"}
    for bad in ({"num-examples": -5, "loss": 1.0, "accuracy": 0.5}, {"loss": 1.0}):
        assert (
            strategy.aggregate_evaluate(1, [_metrics_reply(replies[0], origins[n0], bad)]) is None
        )
    zero = {**good, "num-examples": 0}
    replies_zero = [_metrics_reply(r, origins[r.metadata.src_node_id], zero) for r in replies]
    assert strategy.aggregate_evaluate(1, replies_zero) is None  # missing, not 0/0
    assert "recorded as missing" in caplog.text


class ClaimingGrid(LocalGrid):
    """Node ``liar`` answers the partition query with ``claim`` instead of its own."""

    def __init__(self, *args, liar, claim, **kwargs):
        super().__init__(*args, **kwargs)
        self.liar, self.claim = liar, claim

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        out = []
        for message, reply in zip(list(self.sent[-len(replies) :]), replies, strict=True):
            if (
                message.metadata.message_type == "query"
                and self.partition(message.metadata.dst_node_id) == self.liar
            ):
                reply = Message(
                    RecordDict({METRICS_RECORD: MetricRecord(self.claim)}), reply_to=message
                )
            out.append(reply)
        return out


@pytest.mark.parametrize(
    "claim",
    [
        {"partition-id": float("nan"), "num-partitions": 3},
        {"partition-id": [1, 2], "num-partitions": 3},
        {"partition-id": 1, "num-partitions": float("inf")},
        {"partition-id": 5, "num-partitions": 3},
        {"partition-id": 0, "num-partitions": 3},  # node 0's partition, claimed again
    ],
    ids=["nan", "list", "inf", "out-of-range", "taken"],
)
def test_bad_or_stolen_partition_claims_are_refused(base_config, claim):
    strategy, state, config = _strategy(base_config, "fedqsn", nodes=3, **{"min-nodes": 2})
    grid = ClaimingGrid(3, config, liar=2, claim=claim)
    messages = list(strategy.configure_train(1, ArrayRecord(state), train_config(config), grid))
    liar = next(n for n in grid.contexts if grid.partition(n) == 2)
    sent_to = [m.metadata.dst_node_id for m in messages]
    assert len(messages) == 2 and len(strategy.nodes.refused) == 1
    refused = next(iter(strategy.nodes.refused))
    assert refused not in sent_to  # no proxy at all
    if claim["partition-id"] == 0:
        # the first claim of partition 0 counts, whoever made it; the other is refused
        assert refused in {liar, next(n for n in grid.contexts if grid.partition(n) == 0)}
    else:
        assert refused == liar
    # no two nodes ever share a partition id, hence a client mask
    assert len({strategy.partition_ids[n] for n in sent_to}) == 2
    assert math.isfinite(strategy.nodes.num_partitions)


@pytest.mark.parametrize("strategy_name", ["fedqsn", "fedavg"])
@pytest.mark.parametrize("nodes", [2, 3])
def test_one_huge_finite_update_cannot_blow_up_the_model_by_default(
    base_config, caplog, strategy_name, nodes
):
    """The default norm bound: no median with 2 replies, the norm of what was sent holds."""
    strategy, state, config = _strategy(base_config, strategy_name, nodes=nodes)
    assert config["max-update-norm-ratio"] == 10.0  # the default
    grid = LocalGrid(nodes, config)
    _, origins, replies = _train_round(strategy, state, grid, config)
    key = next(iter(replies[0].content.array_records))
    bad = replies[0]

    def huge(arrays):
        for name in list(arrays):
            values = arrays[name].numpy()
            if values.dtype.kind == "f":
                arrays[name] = Array(
                    np.full_like(values, 1e30 if values.dtype != np.float16 else 6e4)
                )

    replies[0] = _with_arrays(bad, origins[bad.metadata.src_node_id], key, huge)
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert "update norm" in caplog.text
    new = arrays.to_torch_state_dict()
    moved = math.sqrt(sum(float((new[k] - state[k]).double().pow(2).sum()) for k in state))
    size = math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))
    assert moved < size  # honest replies only: the model moved by less than its own norm


def test_a_reply_with_its_own_metric_keys_excludes_no_other_reply(base_config, caplog):
    """The first reply in partition order cannot make the others' metrics 'wrong'."""
    strategy, state, config = _strategy(base_config, "fedqsn")
    grid = LocalGrid(3, config)
    messages = list(strategy.configure_train(1, ArrayRecord(state), train_config(config), grid))
    replies = grid.send_and_receive(messages)
    first = min(replies, key=lambda r: grid.partition(r.metadata.src_node_id))
    metrics = MetricRecord({**dict(first.content[METRICS_RECORD]), "x": 1.0, "l": [1.0, 2.0]})
    content = RecordDict({UPDATE_RECORD: first.content[UPDATE_RECORD], METRICS_RECORD: metrics})
    odd = Message(content, reply_to=messages[replies.index(first)])
    with caplog.at_level(logging.WARNING):
        _, aggregated = strategy.aggregate_train(1, [odd if r is first else r for r in replies])
    assert strategy.round_log[1]["num_aggregated"] == 3 and "rejected" not in caplog.text
    assert set(aggregated) == {"train-loss"}


def test_absurd_example_counts_are_refused_by_the_default_bound(base_config):
    """FedQSN's library default bounds num-examples: 1e308 cannot swamp the others."""
    from fedqsn_flwr.core.masking import policy_for_model
    from fedqsn_flwr.flower.strategies import FedQSN

    _, state, config = _strategy(base_config, "fedqsn")
    model = build_model("cnn")
    strategy = FedQSN(
        policy_for_model(model),
        server_secret=TEST_SECRET,
        min_train_nodes=3,
        min_available_nodes=3,
        node_config_fn=rows_for(config),
        partition_query=True,
    )
    grid = LocalGrid(3, config)
    messages = list(strategy.configure_train(1, ArrayRecord(state), train_config(config), grid))
    replies = grid.send_and_receive(messages)
    metrics = MetricRecord({**dict(replies[0].content[METRICS_RECORD]), "num-examples": 1e308})
    content = RecordDict(
        {UPDATE_RECORD: replies[0].content[UPDATE_RECORD], METRICS_RECORD: metrics}
    )
    hostile = [Message(content, reply_to=messages[0]), *replies[1:]]
    arrays, _ = strategy.aggregate_train(1, hostile)
    assert strategy.round_log[1]["num_aggregated"] == 2
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


def test_a_refused_node_neither_stalls_the_round_nor_is_sampled(base_config, caplog):
    """min-nodes = every connected node, one of them refused: the round goes on without it."""
    strategy, state, config = _strategy(base_config, "fedqsn", nodes=3)
    grid = ClaimingGrid(3, config, liar=2, claim={"partition-id": 0, "num-partitions": 3})
    with caplog.at_level(logging.WARNING):
        messages = list(strategy.configure_train(1, ArrayRecord(state), train_config(config), grid))
    assert len(messages) == 2 and len(strategy.nodes.refused) == 1
    assert "2 of 3 connected nodes may be sampled (min 3)" in caplog.text
