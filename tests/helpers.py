"""An in-process Grid that runs the real ClientApp handlers (no Ray, no network)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict

from fedqsn_flwr.client import handle_evaluate, handle_query, handle_train

Tamper = Callable[[Message], Message]


class LocalGrid:
    """Delivers every message to the real client handlers of ``num_nodes`` nodes.

    Node ids are deliberately unordered and unrelated to partition ids, as in
    Flower. Every message sent and every reply is kept for inspection. ``tamper``
    may replace a node's reply (fault injection); ``train_handler`` replaces the
    project's ClientApp training (e.g. a user's own model).
    """

    def __init__(
        self,
        num_nodes: int,
        config: Mapping[str, Any],
        tamper: Mapping[int, Tamper] | None = None,
        train_handler: Callable[[Message, Context, Mapping[str, Any]], Message] = handle_train,
    ) -> None:
        self.train_handler = train_handler
        self.config = dict(config)
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
        return list(self.contexts)

    def partition(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config["partition-id"])

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for message in messages:
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
            self.replies.append(reply)
            replies.append(reply)
        return replies
