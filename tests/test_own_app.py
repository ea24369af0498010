"""examples/own-app: a user's own Flower app with standard handlers, run in-process.

The real ServerApp ``main`` and the real ``@app.train``/``@app.evaluate``
handlers of the example, with Flower's default evaluation (``fraction_evaluate``
1.0, the handler's own metric names); ``tests/test_flwr_run.py`` runs the same
app with ``flwr run examples/own-app``.
"""

import importlib
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedqsn_flwr import FedQSN, freeze_hidden, load_received, policy_for_model, train_reply
from fedqsn_flwr.flower.protocol import UPDATE_RECORD
from fedqsn_flwr.flower.proxy import decode_update
from fedqsn_flwr.flower.strategies import message_bytes

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own-app"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def own_app():
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield (
            importlib.import_module("own_app.client_app"),
            importlib.import_module("own_app.server_app"),
            importlib.import_module("own_app.task"),
        )
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m == "own_app" or m.startswith("own_app.")]:
            del sys.modules[name]


class HandlerGrid:
    """Delivers messages to the example's handlers; a query gets Flower's error reply."""

    def __init__(self, client_app, num_nodes, run_config):
        self.client_app = client_app
        self.contexts = {
            1000 + 37 * p: Context(
                run_id=1,
                node_id=1000 + 37 * p,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for p in range(num_nodes)
        }
        self.received: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.received.append(message)
            context = self.contexts[message.metadata.dst_node_id]
            kind = message.metadata.message_type
            if kind == MessageType.TRAIN:
                replies.append(self.client_app.train_handler(message, context))
            elif kind == MessageType.EVALUATE:
                replies.append(self.client_app.evaluate_handler(message, context))
            else:  # the example registers no query handler, as most apps
                replies.append(Message(Error(code=0, reason="no query handler"), reply_to=message))
        return replies


def _run_config():
    import tomllib

    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_own_app_trains_and_evaluates_with_flower_defaults(own_app, capsys, caplog):
    client_app, server_app, _ = own_app
    run_config = _run_config()
    grid = HandlerGrid(client_app, 3, run_config)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO):
        server_app.main(grid, context)
    printed = capsys.readouterr().out
    accuracy = [float(a) for a in re.findall(r"global accuracy ([0-9.]+)", printed)]
    assert len(accuracy) == run_config["num-server-rounds"] + 1
    assert accuracy[0] < 0.3 and accuracy[-1] > 0.8  # from random to trained
    assert "rejected reply" not in caplog.text and "failed and is skipped" not in caplog.text
    # evaluation ran with Flower's defaults: every node, the handler's own metric names
    evaluated = [m for m in grid.received if m.metadata.message_type == MessageType.EVALUATE]
    assert len(evaluated) == 3 * run_config["num-server-rounds"]
    assert "eval_acc" in caplog.text and "train_loss" in caplog.text
    # no message carried plain arrays: every client got a proxy
    assert all("arrays" not in m.content.array_records for m in evaluated)
    # an app without a query handler is never sent a query (each would be an error
    # with a traceback on its node): one INFO line says what stands in
    assert not [m for m in grid.received if m.metadata.message_type == MessageType.QUERY]
    assert caplog.text.count("Partition ids:") == 1
    assert "partition_query is off" in caplog.text
    # one line per round with the bytes per client, as the messages measure
    lines = re.findall(r"Round (\d+): bytes per client: ([\d,]+) down, ([\d,]+) up", caplog.text)
    assert [int(r) for r, _, _ in lines] == list(range(1, run_config["num-server-rounds"] + 1))
    sent = [m for m in grid.received if m.metadata.message_type == MessageType.TRAIN][:3]
    down, up = (int(v.replace(",", "")) for v in lines[0][1:])
    assert abs(down - sum(message_bytes(m) for m in sent) / 3) <= 0.5
    assert up > 0


def _first_proxy(client_app, task):
    """A FedQSN (p1 = 0.3, p2 = 0.2) training message for the example's model."""
    torch.manual_seed(0)
    model = task.Net()
    strategy = FedQSN(policy_for_model(model), server_mask_ratio=0.3, client_mask_ratio=0.2)
    grid = HandlerGrid(client_app, 2, _run_config())
    start = ArrayRecord(model.state_dict())
    return model, strategy, next(iter(strategy.configure_train(1, start, ConfigRecord(), grid)))


def test_freeze_hidden_keeps_hidden_entries_zero_with_adam(own_app):
    client_app, _, task = own_app
    _, _, message = _first_proxy(client_app, task)
    x, y = task.load_data(0, 2)
    for frozen in (True, False):
        net = task.Net()
        received = load_received(net, message.content)
        hidden = received.hidden_masks()
        assert hidden and all(not net.state_dict()[n][m].any() for n, m in hidden.items())
        if frozen:
            with freeze_hidden(net, received):
                task.train(net, x, y, epochs=1, lr=0.01)
        else:
            task.train(net, x, y, epochs=1, lr=0.01)
        moved = any(net.state_dict()[n][m].any() for n, m in hidden.items())
        assert moved is not frozen  # the hooks are what keeps them at zero
    # hooks are gone after the with-block: training now moves hidden entries
    net = task.Net()
    received = load_received(net, message.content)
    with freeze_hidden(net, received):
        pass
    task.train(net, x, y, epochs=1, lr=0.01)
    assert any(net.state_dict()[n][m].any() for n, m in received.hidden_masks().items())


def test_train_reply_is_the_visible_update_and_plain_arrays_for_fedavg(own_app):
    client_app, _, task = own_app
    model, strategy, message = _first_proxy(client_app, task)
    net = task.Net()
    received = load_received(net, message.content)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)
    reply = train_reply(message, net, received, num_examples=7, metrics={"x": 1.0})
    assert set(reply.content.array_records) == {UPDATE_RECORD}
    assert dict(reply.content["metrics"]) == {"num-examples": 7, "x": 1.0}
    spec = strategy._sent[message.metadata.dst_node_id]
    deltas = decode_update(reply.content[UPDATE_RECORD], spec, strategy.policy)
    for name, delta in deltas.items():  # +0.5 on every visible value, in global units
        axis = strategy.policy.unit_axes.get(name)
        share = 1.0 if axis is None else delta.shape[axis] / strategy.policy.unit_counts[name]
        assert torch.allclose(delta, torch.full_like(delta, 0.5 * share), atol=1e-3), name
    assert start  # plain arrays: a FedAvg message comes back as FedAvg arrays
    plain = Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord()}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    net = task.Net()
    received = load_received(net, plain.content)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in model.state_dict().items())
    with freeze_hidden(net, received) as frozen:
        assert not frozen._handles
    reply = train_reply(plain, net, received, num_examples=3)
    assert set(reply.content.array_records) == {"arrays"}


def test_load_received_names_what_is_missing():
    with pytest.raises(KeyError, match="neither a FedQSN proxy"):
        load_received(torch.nn.Linear(2, 2), RecordDict({"config": ConfigRecord()}))


def test_readme_quickstart_is_the_examples_code():
    """The README's own-app snippets are copied from the example, not paraphrased."""
    readme = README.read_text()
    blocks = re.findall(r"```python\n# examples/own-app/(\S+)\n(.*?)```", readme, re.S)
    assert {name for name, _ in blocks} >= {"own_app/client_app.py", "own_app/server_app.py"}
    for name, code in blocks:
        assert code.strip() in (EXAMPLE / name).read_text(), name


def test_strategy_options_are_keyword_only_and_fedavg_arguments_honoured_or_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    policy = policy_for_model(model)
    with pytest.raises(TypeError):
        FedQSN(policy, 0.1)  # p1 positionally
    with pytest.raises(TypeError, match="unexpected keyword"):
        FedQSN(policy, fraction_fit=0.5)  # a typo / the deprecated API
    with pytest.raises(ValueError, match="arrayrecord_key"):
        FedQSN(policy, arrayrecord_key="weights")
    with pytest.raises(TypeError, match="MaskPolicy"):
        FedQSN(model)
    strategy = FedQSN(policy, fraction_evaluate=0.25, weighted_by_key="n", configrecord_key="cfg")
    assert (strategy.fraction_evaluate, strategy.weighted_by_key) == (0.25, "n")
    assert strategy.configrecord_key == "cfg" and strategy.privacy_metrics is False


def test_metric_aggregation_functions_are_honoured(own_app):
    client_app, _, task = own_app
    torch.manual_seed(0)
    model = task.Net()
    seen = {}

    def biggest(kind):
        def aggregate(records, key):
            seen[kind] = (len(records), key)
            best = max(records, key=lambda r: r["metrics"][key])
            return MetricRecord({k: v for k, v in best["metrics"].items() if k != key})

        return aggregate

    strategy = FedQSN(
        policy_for_model(model),
        train_metrics_aggr_fn=biggest("train"),
        evaluate_metrics_aggr_fn=biggest("evaluate"),
        min_train_nodes=3,
        min_evaluate_nodes=3,
        min_available_nodes=3,
    )
    grid = HandlerGrid(client_app, 3, _run_config())
    state = ArrayRecord(model.state_dict())
    replies = grid.send_and_receive(strategy.configure_train(1, state, ConfigRecord(), grid))
    arrays, train_metrics = strategy.aggregate_train(1, replies)
    assert seen["train"] == (3, "num-examples") and set(train_metrics) == {"train_loss"}
    replies = grid.send_and_receive(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert seen["evaluate"] == (3, "num-examples") and set(metrics) == {"eval_loss", "eval_acc"}
    largest = max(replies, key=lambda r: r.content["metrics"]["num-examples"])
    assert metrics["eval_acc"] == largest.content["metrics"]["eval_acc"]
