"""What a strategy keeps of every round: message sizes and the round's figures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from logging import INFO
from typing import Any

from flwr.app import Message
from flwr.supercore import log

from fedqsn_flwr.flower.strategies.utils import MessageEntry, message_bytes


class RoundRecords:
    """The size of every message sent and received, and every round's figures.

    :attr:`rounds` is the strategy's ``round_log``: per round, a dict of floats
    (``bytes_down``/``bytes_up``: mean bytes per client of the training messages
    and replies; ``num_sampled``, ``num_aggregated``, ``num_failures``,
    ``train_loss``, timings and, for FedQSN, the privacy metrics).
    :attr:`messages` is the ``message_log``: one :class:`MessageEntry` per message.
    """

    def __init__(self) -> None:
        self.messages: list[MessageEntry] = []
        self.rounds: dict[int, dict[str, float]] = {}

    def add(self, server_round: int, **values: float) -> None:
        """Set figures of ``server_round``."""
        self.rounds.setdefault(server_round, {}).update(values)

    def record(
        self,
        server_round: int,
        messages: list[Message],
        direction: str,
        partition: Callable[[int], int],
    ) -> None:
        """Log the size of every message (``direction``: "down" or "up")."""
        for message in messages:
            node = (
                message.metadata.dst_node_id
                if direction == "down"
                else message.metadata.src_node_id
            )
            self.messages.append(
                MessageEntry(
                    server_round=server_round,
                    message_type=message.metadata.message_type,
                    direction=direction,
                    node_id=node,
                    partition_id=partition(node),
                    num_bytes=message_bytes(message) if message.has_content() else 0,
                )
            )

    def mean_bytes(self, server_round: int, message_type: str, direction: str) -> float:
        """Mean size of a round's messages of one type and direction (0: none)."""
        sizes = [
            e.num_bytes
            for e in self.messages
            if e.server_round == server_round
            and e.message_type == message_type
            and e.direction == direction
            and e.num_bytes > 0
        ]
        return sum(sizes) / len(sizes) if sizes else 0.0

    def report_bytes(self, server_round: int) -> None:
        """One log line: the round's training bytes per client, down and up."""
        entry = self.rounds.get(server_round, {})
        log(
            INFO,
            "Round %d: bytes per client: %s down, %s up (training; round_log[%d])",
            server_round,
            f"{entry.get('bytes_down', 0.0):,.0f}",
            f"{entry.get('bytes_up', 0.0):,.0f}",
            server_round,
        )

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue the records."""
        return {
            "round_log": {r: dict(v) for r, v in self.rounds.items()},
            "message_log": [asdict(e) for e in self.messages],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state`."""
        self.rounds = {int(r): dict(v) for r, v in state["round_log"].items()}
        self.messages = [MessageEntry(**e) for e in state["message_log"]]
