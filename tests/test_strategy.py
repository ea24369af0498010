"""FedQSN rounds with real messages and the real client handlers, in-process."""

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.core.aggregation import ClientUpdate, apply_updates
from fedqsn_flwr.core.feedback import server_hidden
from fedqsn_flwr.core.masking import policy_for_model
from fedqsn_flwr.flower.protocol import (
    LAYOUT_RECORD,
    METRICS_RECORD,
    PROXY_RECORD,
    UPDATE_RECORD,
)
from fedqsn_flwr.flower.proxy import (
    checked_update,
    decode_update,
    encode_proxy,
    proxy_norm,
)
from fedqsn_flwr.flower.strategies import FedQSN
from tests.helpers import TEST_SECRET, LocalGrid, rows_for


def _strategy(num_nodes, config, seed=3, secret=TEST_SECRET):
    torch.manual_seed(0)
    model = build_model("cnn")
    strategy = FedQSN(
        policy_for_model(model),
        server_mask_ratio=0.2,
        client_mask_ratio=0.2,
        bit_width=4,
        block_size=64,
        seed=seed,
        server_secret=secret,
        fraction_evaluate=0.0,
        min_train_nodes=num_nodes,
        min_available_nodes=num_nodes,
        node_config_fn=rows_for(config, secret),
        partition_query=True,
    )
    return strategy, model.state_dict()


def _nan_update(reply):
    update = reply.content[UPDATE_RECORD]
    arrays = {k: update[k] for k in update.keys()}
    sent = arrays["fc1.bias"].numpy()
    arrays["fc1.bias"] = Array(np.full(sent.shape, np.nan, sent.dtype))
    return Message(
        RecordDict(
            {UPDATE_RECORD: ArrayRecord(arrays), METRICS_RECORD: reply.content[METRICS_RECORD]}
        ),
        reply_to=_origin(reply),
    )


_ORIGINS = {}


def _origin(reply):
    return _ORIGINS[reply.metadata.src_node_id]


def _round_replies(strategy, state, grid):
    """Send round 1's proxies through ``grid``; return its replies."""
    messages = list(strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid))
    for message in messages:
        _ORIGINS[message.metadata.dst_node_id] = message
    return grid.send_and_receive(messages)


def _expected(strategy, state, grid, replies, valid_partitions):
    """The global model after aggregating only the replies of ``valid_partitions``."""
    updates = []
    for reply in replies:
        partition = grid.partition(reply.metadata.src_node_id)
        if partition not in valid_partitions:
            continue
        visible = strategy.client_mask(1, partition)
        _, _, spec = encode_proxy(
            state,
            strategy.policy,
            visible,
            bit_width=4,
            block_size=64,
            update_bit_width=strategy.update_bit_width,
        )
        deltas = decode_update(reply.content[UPDATE_RECORD], spec, strategy.policy)
        weight = reply.content[METRICS_RECORD]["num-examples"]
        updates.append(ClientUpdate(deltas, visible, weight))
    return apply_updates(state, updates, strategy.policy)


def test_bad_and_failed_replies_are_skipped_and_the_rest_aggregated_exactly(base_config, caplog):
    strategy, state = _strategy(4, base_config)
    failing = lambda reply: Message(Error(code=0, reason="client crashed"), reply_to=_origin(reply))  # noqa: E731
    grid = LocalGrid(4, base_config, tamper={1: _nan_update, 2: failing})
    replies = _round_replies(strategy, state, grid)
    # expected: the per-position mean over the two valid replies (partitions 0 and 3)
    expected = _expected(strategy, state, grid, replies, (0, 3))

    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    node_of = {grid.partition(n): n for n in grid.contexts}
    assert f"rejected reply from node {node_of[1]}: 'fc1.bias' holds NaN" in caplog.text
    assert f"node {node_of[2]} failed and is skipped: client crashed" in caplog.text
    assert strategy.round_log[1]["num_aggregated"] == 2
    assert strategy.round_log[1]["num_failures"] == 2
    assert "train-loss" in metrics


def test_a_round_with_no_valid_reply_leaves_the_global_model_unchanged(base_config):
    strategy, state = _strategy(2, base_config)
    grid = LocalGrid(2, base_config)
    messages = list(strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid))
    errors = [Message(Error(code=0, reason="down"), reply_to=m) for m in messages]
    assert strategy.aggregate_train(1, errors) == (None, None)
    result = strategy.start(LocalGrid(2, base_config), ArrayRecord(state), num_rounds=1)
    assert len(result.arrays) > 0


def test_same_seed_and_secret_give_the_same_federation(base_config):
    finals = []
    for secret in (b"a" * 32, b"a" * 32, b"b" * 32):
        strategy, state = _strategy(3, base_config, secret=secret)
        result = strategy.start(LocalGrid(3, base_config), ArrayRecord(state), num_rounds=2)
        finals.append(result.arrays.to_torch_state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert any(not torch.equal(finals[0][k], finals[2][k]) for k in finals[0])


def _scaled_update(factor):
    def tamper(reply):
        update = reply.content[UPDATE_RECORD]
        arrays = {k: Array(update[k].numpy() * factor) for k in update.keys()}
        return Message(
            RecordDict(
                {UPDATE_RECORD: ArrayRecord(arrays), METRICS_RECORD: reply.content[METRICS_RECORD]}
            ),
            reply_to=_origin(reply),
        )

    return tamper


def _claims(num_examples):
    def tamper(reply):
        metrics = MetricRecord(
            {**dict(reply.content[METRICS_RECORD]), "num-examples": num_examples}
        )
        return Message(
            RecordDict({UPDATE_RECORD: reply.content[UPDATE_RECORD], METRICS_RECORD: metrics}),
            reply_to=_origin(reply),
        )

    return tamper


def test_absurd_num_examples_and_outlier_norms_are_rejected(base_config, caplog):
    torch.manual_seed(0)
    model = build_model("cnn")
    strategy = FedQSN(
        policy_for_model(model),
        server_mask_ratio=0.2,
        client_mask_ratio=0.2,
        bit_width=4,
        block_size=64,
        seed=3,
        server_secret=TEST_SECRET,
        fraction_evaluate=0.0,
        min_train_nodes=5,
        min_available_nodes=5,
        max_num_examples=10_000,
        max_update_norm_ratio=5.0,
        node_config_fn=rows_for(base_config),
        partition_query=True,
    )
    state = model.state_dict()
    grid = LocalGrid(
        5, base_config, tamper={1: _scaled_update(1000.0), 2: _claims(10**9), 3: _claims(-4)}
    )
    replies = _round_replies(strategy, state, grid)
    expected = _expected(strategy, state, grid, replies, (0, 4))
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    node_of = {grid.partition(n): n for n in grid.contexts}
    assert f"node {node_of[1]}: update norm" in caplog.text
    assert f"node {node_of[2]}: 'num-examples' = 1000000000 exceeds the bound" in caplog.text
    assert f"node {node_of[3]}: 'num-examples' = -4 is outside (0, 10000]" in caplog.text
    assert strategy.round_log[1]["num_aggregated"] == 2


def _with_norm(target):
    """A tamper that scales a reply's update to L2 norm ``target`` (global units)."""

    def tamper(reply):
        update = reply.content[UPDATE_RECORD]
        node = reply.metadata.src_node_id
        strategy = _TAMPERED_BY[node]
        _, norm = checked_update(update, strategy._sent[node], strategy.policy)
        arrays = {}
        for key in update.keys():
            values = update[key].numpy()
            arrays[key] = Array((values * (target / norm)).astype(values.dtype))
        return Message(
            RecordDict(
                {UPDATE_RECORD: ArrayRecord(arrays), METRICS_RECORD: reply.content[METRICS_RECORD]}
            ),
            reply_to=_origin(reply),
        )

    return tamper


_TAMPERED_BY = {}


def test_update_norm_bound_does_not_depend_on_hidden_values(base_config, caplog):
    """Colluders who probe with chosen update norms learn nothing about hidden weights."""
    strategy, state = _strategy(2, base_config)
    hidden = server_hidden(strategy.policy, strategy.server_mask)
    # the same model with its server-hidden units 30 times larger: a global-norm bound
    # would accept more under it, and acceptance would tell the client so
    inflated = {k: v.clone() for k, v in state.items()}
    for name, units in hidden.items():
        axis = strategy.policy.unit_axes[name]
        inflated[name].index_copy_(axis, units, inflated[name].index_select(axis, units) * 30.0)

    def norm(s):
        return float(torch.cat([v.flatten() for v in s.values() if v.is_floating_point()]).norm())

    ratio = strategy.max_update_norm_ratio
    decisions = {}
    for name, global_state in (("state", state), ("inflated", inflated)):
        for factor in (0.99, 1.01):
            strategy, _ = _strategy(2, base_config)
            grid = LocalGrid(2, base_config)
            messages = list(
                strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), grid)
            )
            node = messages[0].metadata.dst_node_id
            sent = proxy_norm(messages[0].content[PROXY_RECORD], messages[0].content[LAYOUT_RECORD])
            target = factor * ratio * sent
            # with the whole model's norm as the bound, the inflated model accepts both
            assert name == "state" or target < ratio * norm(global_state)
            for message in messages:
                _ORIGINS[message.metadata.dst_node_id] = message
                _TAMPERED_BY[message.metadata.dst_node_id] = strategy
            grid.tamper = {grid.partition(node): _with_norm(target)}
            replies = grid.send_and_receive(messages)
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                strategy.aggregate_train(1, replies)
            decisions[name, factor] = f"rejected reply from node {node}" not in caplog.text
    assert decisions == {
        ("state", 0.99): True,
        ("state", 1.01): False,
        ("inflated", 0.99): True,
        ("inflated", 1.01): False,
    }
