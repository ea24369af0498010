"""Which nodes a round samples: partition ids, refused nodes, seeded sampling."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedqsn_flwr.core.secret import derive_seed
from fedqsn_flwr.flower.protocol import PARTITION_ID_KEY, QUERY_ASK_KEY
from fedqsn_flwr.flower.replies import partition_claim, reason, reject
from fedqsn_flwr.flower.strategies.utils import PURPOSES


class NodeSampler:
    """Partition ids of the connected nodes and reproducible sampling among them.

    Sampling is seeded by ``seed``, the round and the purpose, and ordered by
    partition id, so the same federation samples the same clients whatever ids
    Flower gives its nodes.

    Parameters
    ----------
    seed : int
        Seed of node sampling (public: clients may know it).
    partition_query : bool
        Ask every new node for its partition id with a Flower ``query``
        message (a ClientApp with an ``@app.query`` handler answers it); off, a
        node's partition id is its node id.

    """

    def __init__(self, *, seed: int, partition_query: bool) -> None:
        self.seed = seed
        self.partition_query = partition_query
        self.partition_ids: dict[int, int] = {}
        #: Nodes whose partition claim was refused: they are never sampled.
        self.refused: dict[int, str] = {}
        self.num_partitions = 0  # as reported by the nodes (0: unknown)
        #: The nodes sampled last, by message type (their replies count).
        self.sampled: dict[str, set[int]] = {}
        self.query_timeout = 60.0
        self._told_fallback = False

    def partition(self, node_id: int) -> int:
        """A node's partition id (its node id while unknown)."""
        return self.partition_ids.get(node_id, node_id)

    def state(self) -> dict[str, Any]:
        """What a resumed run needs: the partition of every node seen."""
        return {"partition_ids": dict(self.partition_ids), "num_partitions": self.num_partitions}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state`."""
        self.partition_ids = dict(state["partition_ids"])
        self.num_partitions = int(state["num_partitions"])

    def sample(
        self,
        grid: Grid,
        server_round: int,
        *,
        fraction: float,
        min_nodes: int,
        min_available: int,
        purpose: int,
    ) -> list[int]:
        """Wait for ``min_available`` nodes; sample ``fraction`` of them, at least ``min_nodes``."""
        wanted = max(min_available, min_nodes)
        while True:
            all_nodes = sorted(grid.get_node_ids())
            self._learn(grid, all_nodes)
            allowed = [n for n in all_nodes if n not in self.refused]
            # as Flower: wait for enough connected nodes; never sample nobody
            if len(all_nodes) >= wanted and allowed:
                break
            log(
                INFO,
                "Waiting for nodes: %d connected, %d refused (need %d)",
                len(all_nodes),
                len(all_nodes) - len(allowed),
                wanted,
            )
            time.sleep(1)
        if len(allowed) < min_nodes:
            log(
                WARNING,
                "Round %d: %d of %d connected nodes may be sampled (min %d): the rest are refused",
                server_round,
                len(allowed),
                len(all_nodes),
                min_nodes,
            )
        ordered = sorted(allowed, key=lambda n: (self.partition_ids[n], n))
        size = min(len(ordered), max(int(len(ordered) * fraction), min_nodes))
        rng = random.Random(derive_seed("sampling", self.seed, server_round, purpose))
        chosen = sorted(rng.sample(ordered, size), key=ordered.index)
        log(INFO, "Round %d: sampled %d of %d nodes", server_round, size, len(ordered))
        self.sampled[PURPOSES[purpose]] = set(chosen)
        return chosen

    def replies(
        self, server_round: int, replies: Iterable[Message], message_type: str
    ) -> list[Message]:
        """One reply per sampled node (the first), in partition order; others are logged.

        Partition order makes aggregation independent of arrival order.
        """
        sampled = self.sampled.get(message_type, set())
        kept: list[Message] = []
        seen: set[int] = set()
        for message in replies:
            node_id = message.metadata.src_node_id
            if node_id not in sampled:
                reject(server_round, message, "the node was not sampled this round")
            elif node_id in seen:
                reject(server_round, message, "a second reply (the first counts)")
            else:
                seen.add(node_id)
                kept.append(message)
        return sorted(
            kept,
            key=lambda m: (
                self.partition_ids.get(m.metadata.src_node_id, 0),
                m.metadata.src_node_id,
            ),
        )

    def refuse(self, node_id: int, why: str) -> None:
        """Never sample ``node_id`` again."""
        self.refused[node_id] = why
        log(WARNING, "Node %d is refused and never sampled: %s", node_id, why)

    def _learn(self, grid: Grid, node_ids: list[int]) -> None:
        """Learn the partition ids of nodes not seen before.

        A partition whose node is no longer connected (it restarted under a new
        node id, or the run was resumed) goes to the node that claims it now.
        """
        unknown = [n for n in node_ids if n not in self.partition_ids and n not in self.refused]
        if not unknown:
            return
        if not self.partition_query:
            if not self.partition_ids:
                log(INFO, "Partition ids: Flower's node ids (partition_query is off)")
            self.partition_ids.update((n, n) for n in unknown)
            return
        for reply in self._ask(grid, unknown):
            node_id = reply.metadata.src_node_id
            try:
                partition, partitions = partition_claim(reply)
            except Exception as err:  # a malformed answer must not stop the run
                self.refuse(node_id, f"bad partition claim: {reason(err)}")
                continue
            owner = next((n for n, p in self.partition_ids.items() if p == partition), None)
            if owner is not None and owner != node_id and owner in node_ids:
                self.refuse(node_id, f"partition-id {partition} is already node {owner}'s")
                continue
            if owner is not None and owner != node_id:
                del self.partition_ids[owner]  # its node is gone
            self.partition_ids[node_id] = partition
            self.num_partitions = max(self.num_partitions, partitions)
        unanswered = [n for n in unknown if n not in self.refused and n not in self.partition_ids]
        if unanswered and not self._told_fallback:
            self._told_fallback = True
            log(
                INFO,
                "Partition ids: %d node(s) did not answer the partition query; their node id "
                "stands in",
                len(unanswered),
            )
        for node_id in unanswered:
            self.partition_ids[node_id] = node_id

    def _ask(self, grid: Grid, node_ids: list[int]) -> list[Message]:
        """The first answer without an error of each node asked."""
        queries = [
            Message(
                content=RecordDict({"config": ConfigRecord({QUERY_ASK_KEY: PARTITION_ID_KEY})}),
                message_type=MessageType.QUERY,
                dst_node_id=node_id,
            )
            for node_id in node_ids
        ]
        answers: dict[int, Message] = {}
        answered: set[int] = set()
        for reply in grid.send_and_receive(queries, timeout=self.query_timeout):
            node_id = reply.metadata.src_node_id
            if node_id not in node_ids or node_id in answered:
                continue  # not asked, or a second answer: the first counts
            answered.add(node_id)
            if not reply.has_error():  # an error: no query handler, node id stands in
                answers[node_id] = reply
        return list(answers.values())
