"""An in-process Grid that runs the real ClientApp handlers (no Ray, no network).

Used by the benchmarks and the tests: the same messages as in a Flower run go
through the same client code, without the engine's process and scheduling noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict

from fedqsn_flwr.app.client import handle_evaluate, handle_query, handle_train

#: Replaces a node's reply (fault injection).
Tamper = Callable[[Message], Message]
#: A ClientApp handler: (message, context, run config) -> reply.
Handler = Callable[[Message, Context, Mapping[str, Any]], Message]


class InProcessGrid:
    """Delivers every message to the real client handlers of ``num_nodes`` nodes.

    Node ids are deliberately unordered and unrelated to partition ids, as in
    Flower.

    Parameters
    ----------
    num_nodes : int
        Virtual SuperNodes; node ``i`` holds partition ``i`` of ``num_nodes``.
    config : Mapping[str, Any]
        The validated run config the client handlers read.
    tamper : Mapping[int, Tamper], optional
        Per partition id, a function that replaces that node's training reply.
    train_handler : Handler (default: :func:`fedqsn_flwr.app.client.handle_train`)
        The training handler (e.g. a user's own model).
    keep_messages : bool (default: True)
        Keep every message sent and every reply in ``sent``/``replies`` for
        inspection (turn off to measure memory).

    """

    def __init__(
        self,
        num_nodes: int,
        config: Mapping[str, Any],
        tamper: Mapping[int, Tamper] | None = None,
        train_handler: Handler = handle_train,
        keep_messages: bool = True,
    ) -> None:
        self.train_handler = train_handler
        self.config = dict(config)
        self.keep_messages = keep_messages
        self.contexts = {
            9_000_000 - 7919 * partition: Context(
                run_id=1,
                node_id=9_000_000 - 7919 * partition,
                node_config={"partition-id": partition, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for partition in range(num_nodes)
        }
        self.tamper = dict(tamper or {})
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        """Ids of all virtual nodes."""
        return list(self.contexts)

    def partition(self, node_id: int) -> int:
        """The partition id of a node."""
        return int(self.contexts[node_id].node_config["partition-id"])

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        """Run each message through its node's handler; return the replies."""
        replies = []
        for message in messages:
            if self.keep_messages:
                self.sent.append(message)
            context = self.contexts[message.metadata.dst_node_id]
            kind = message.metadata.message_type
            if kind == MessageType.QUERY:
                reply = handle_query(message, context)
            elif kind == MessageType.TRAIN:
                reply = self.train_handler(message, context, self.config)
            else:
                reply = handle_evaluate(message, context, self.config)
            partition = self.partition(message.metadata.dst_node_id)
            if kind == MessageType.TRAIN and partition in self.tamper:
                reply = self.tamper[partition](reply)
            if self.keep_messages:
                self.replies.append(reply)
            replies.append(reply)
        return replies


def run_in_process(
    overrides: Mapping[str, Any],
    num_nodes: int = 10,
    project_dir: Path | None = None,
    cpus_per_node: float = 1.0,
) -> Path:
    """:func:`~fedqsn_flwr.experiments.simulation.simulate` without Flower's engine.

    The same ServerApp logic (:func:`~fedqsn_flwr.app.server.run_server`) and
    client handlers, over an :class:`InProcessGrid` in this process: no Ray, no
    processes, seconds instead of a minute for a small federation. The run
    folder is the same; the messages differ from a real run only in their
    metadata (node ids), so sizes can differ by a few bytes. ``cpus_per_node``
    is ignored (same signature as ``simulate``).
    """
    from fedqsn_flwr.app.config import output_root, resolve
    from fedqsn_flwr.app.results import run_name
    from fedqsn_flwr.app.server import run_server

    config = resolve({}, project_dir or Path.cwd(), overrides)
    config = {**config, "run-name": run_name(config)}
    run_server(InProcessGrid(num_nodes, config), config)
    return output_root(config) / str(config["run-name"])
