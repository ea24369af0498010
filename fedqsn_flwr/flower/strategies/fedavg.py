"""Flower's FedAvg with reproducible sampling, byte accounting and checked replies.

The base of every strategy in this project: :class:`~fedqsn_flwr.flower.strategies.fedqsn.FedQSN`
changes what is sent and how updates are folded in, nothing else.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

from fedqsn_flwr.core.masking import derive_seed
from fedqsn_flwr.flower.protocol import (
    METRICS_RECORD,
    PARTITION_ID_KEY,
    QUERY_ASK_KEY,
    SERVER_ROUND_KEY,
    TRAIN_LOSS_KEY,
)
from fedqsn_flwr.flower.proxy import InvalidUpdate, array_values
from fedqsn_flwr.flower.replies import checked_array, checked_metrics, partition_claim, reason
from fedqsn_flwr.flower.strategies.utils import (
    EVALUATE,
    PURPOSES,
    TRAIN,
    MessageEntry,
    MessageSink,
    MetricsAggrFn,
    NodeConfigFn,
    StateEvaluateFn,
    aggregate_metrics,
    l2_norm,
    message_bytes,
    proxy_metrics,
    shifted_result,
)


class MeasuredFedAvg(FedAvg):
    """Flower's FedAvg with reproducible sampling and byte accounting.

    Aggregation is Flower's own :class:`~flwr.serverapp.strategy.FedAvg`; what
    differs: sampling is seeded and ordered by partition id, every message's
    size is logged, and every reply is checked before it counts (a bad one is
    skipped with a log line, never the round). Every option is keyword-only.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Share of connected nodes sampled for training each round.
    fraction_evaluate : float (default: 1.0)
        Share of connected nodes sampled for federated evaluation (0: none).
    min_train_nodes : int (default: 2)
        Fewest nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Fewest nodes sampled for evaluation.
    min_available_nodes : int (default: 2)
        Nodes that must be connected before a round starts.
    weighted_by_key : str (default: "num-examples")
        Metric of every reply that weighs it in aggregation.
    arrayrecord_key : str (default: "arrays")
        Record holding the model's arrays in messages and replies.
    configrecord_key : str (default: "config")
        Record holding the round's config in messages.
    train_metrics_aggr_fn : MetricsAggrFn, optional
        Aggregates the valid train replies' metrics (Flower's weighted mean by
        default).
    evaluate_metrics_aggr_fn : MetricsAggrFn, optional
        Aggregates the valid evaluate replies' metrics (same default).
    seed : int (default: 0)
        Seed of node sampling (public: clients may know it; masks come from
        FedQSN's server secret, never from it).
    proxy_evaluate_fn : StateEvaluateFn, optional
        Called in ``configure_train`` on the model each client receives, decoded
        from the actual message; returns an accuracy or named metrics, whose mean
        over clients goes into ``round_log[r]["proxy_accuracy"]`` (``proxy_<name>``).
    message_sink : MessageSink, optional
        Called with ``(server_round, partition_id, message)`` for every training
        and evaluation message sent (e.g. to save what clients received, for the
        attacks).
    max_num_examples : float (default: 1e9)
        Replies claiming more examples than this are rejected (a finite bound
        keeps one client's claimed weight from swamping the others' and the sums
        finite).
    max_update_norm_ratio : float (default: 10.0)
        Robustness to a single hostile client: an update (reply minus what was
        sent, in global units) whose L2 norm exceeds this many times the norm of
        the model the client was sent (the global model here; FedQSN's proxy) is
        rejected, and with at least 3 replies left, so is one
        exceeding this many times the round's median update norm. ``inf``: off.
    node_config_fn : NodeConfigFn, optional
        Called with ``(partition_id, num_partitions)`` for every train and
        evaluate message; its items join that message's config only (this
        project's app sends each client the rows it holds). Counted in the
        message's bytes.
    partition_query : bool (default: False)
        Ask every new node for its partition id with a Flower ``query`` message,
        so that sampling, client masks and ``node_config_fn`` follow data
        partitions rather than Flower's node ids. Needs a ClientApp with an
        ``@app.query`` handler that answers it (this project's app has one); a
        ClientApp without one would log an error per node. Off: a node's
        partition id is its node id.

    Resuming: after :meth:`restore` with a checkpoint taken after round ``n``,
    :meth:`start` runs rounds ``n + 1 .. num_rounds`` through Flower's own round
    loop (its log counts from 1; the strategy's calls, records and ``Result``
    carry the real round numbers).

    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        seed: int = 0,
        proxy_evaluate_fn: StateEvaluateFn | None = None,
        message_sink: MessageSink | None = None,
        max_num_examples: float = 1e9,
        max_update_norm_ratio: float = 10.0,
        node_config_fn: NodeConfigFn | None = None,
        partition_query: bool = False,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if not max_update_norm_ratio > 0:
            raise ValueError(f"max_update_norm_ratio must be > 0, got {max_update_norm_ratio}")
        self.seed = seed
        self.max_num_examples = max_num_examples
        self.max_update_norm_ratio = max_update_norm_ratio
        self.node_config_fn = node_config_fn
        self.partition_query = partition_query
        self._model_norm = math.inf
        #: Nodes whose partition claim was refused: they are never sampled.
        self.refused: dict[int, str] = {}
        self._sampled: dict[str, set[int]] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        self.proxy_evaluate_fn = proxy_evaluate_fn
        self.message_sink = message_sink
        self.partition_ids: dict[int, int] = {}
        self._query_timeout: float = 60.0
        self._told_fallback = False
        self.num_partitions = 0  # as reported by the nodes (0: unknown)
        self.message_log: list[MessageEntry] = []
        self.round_log: dict[int, dict[str, float]] = {}
        #: Rounds a restored checkpoint had finished (see :meth:`restore`).
        self.completed_rounds = 0
        self._restored = False
        # The last round whose evaluation was aggregated (Flower's loop calls
        # aggregate_evaluate every round, even with nothing to evaluate).
        self._last_round = 0
        # Added to Flower's round numbers while start() runs a resumed run.
        self._round_offset = 0

    # -- checkpoints --------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """The bookkeeping a restarted run needs to continue exactly."""
        return {
            "partition_ids": dict(self.partition_ids),
            "num_partitions": self.num_partitions,
            "round_log": {r: dict(v) for r, v in self.round_log.items()},
            "message_log": [asdict(e) for e in self.message_log],
            "completed_rounds": self._last_round,
        }

    def restore(
        self, state: Mapping[str, Any], global_state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Take back what :meth:`checkpoint_state` returned (``global_state``: the model's).

        The next :meth:`start` continues after the checkpoint's last round.
        """
        rounds = [int(r) for r in state["round_log"]]
        self.completed_rounds = int(state.get("completed_rounds", max(rounds, default=0)))
        self._last_round = self.completed_rounds
        self._restored = True
        self.partition_ids = dict(state["partition_ids"])
        self.num_partitions = int(state["num_partitions"])
        self.round_log = {int(r): dict(v) for r, v in state["round_log"].items()}
        self.message_log = [MessageEntry(**e) for e in state["message_log"]]

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's :meth:`~flwr.serverapp.strategy.Strategy.start`, resumable.

        After :meth:`restore`, ``initial_arrays`` must be the checkpoint's global
        model: Flower's own loop then runs the remaining rounds, numbered from
        the checkpoint on, and the restored model is not evaluated again.
        """
        offset = self.completed_rounds
        # partition queries wait as long as a round (at least a minute): a ClientApp
        # that starts slowly on a loaded machine must not lose its partition to a fallback
        self._query_timeout = max(60.0, timeout)
        if not self._restored:
            return super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
        if offset >= num_rounds:
            log(INFO, "All %d rounds were finished before; nothing to resume", num_rounds)
            return Result(arrays=initial_arrays)
        log(
            INFO,
            "Resuming after round %d: Flower's rounds 1..%d below are rounds %d..%d",
            offset,
            num_rounds - offset,
            offset + 1,
            num_rounds,
        )

        def shifted_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 or evaluate_fn is None:
                return None  # evaluated when its round finished
            return evaluate_fn(server_round + offset, arrays)

        self._round_offset = offset
        try:
            result = super().start(
                grid,
                initial_arrays,
                num_rounds - offset,
                timeout,
                train_config,
                evaluate_config,
                shifted_evaluate if evaluate_fn is not None else None,
            )
        finally:
            self._round_offset = 0
            self._restored = False  # a later start() begins a new run
        return shifted_result(result, offset)

    # -- sampling ---------------------------------------------------------------

    def _learn_partition_ids(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes not seen before for their partition id (falls back to node id).

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
        queries = [
            Message(
                content=RecordDict({"config": ConfigRecord({QUERY_ASK_KEY: PARTITION_ID_KEY})}),
                message_type=MessageType.QUERY,
                dst_node_id=node_id,
            )
            for node_id in unknown
        ]
        answered: set[int] = set()
        for reply in grid.send_and_receive(queries, timeout=self._query_timeout):
            node_id = reply.metadata.src_node_id
            if node_id not in unknown or node_id in answered:
                continue  # not asked, or a second answer: the first counts
            answered.add(node_id)
            if reply.has_error():
                continue  # no query handler (a user's own ClientApp): node id below
            try:
                partition, partitions = partition_claim(reply)
            except Exception as err:  # a malformed answer must not stop the run
                self._refuse(node_id, f"bad partition claim: {reason(err)}")
                continue
            owner = next((n for n, p in self.partition_ids.items() if p == partition), None)
            if owner is not None and owner != node_id and owner in node_ids:
                self._refuse(node_id, f"partition-id {partition} is already node {owner}'s")
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

    def _refuse(self, node_id: int, why: str) -> None:
        self.refused[node_id] = why
        log(WARNING, "Node %d is refused and never sampled: %s", node_id, why)

    def _sample(
        self, grid: Grid, server_round: int, fraction: float, min_nodes: int, purpose: int
    ) -> list[int]:
        wanted = max(self.min_available_nodes, min_nodes)
        while True:
            all_nodes = sorted(grid.get_node_ids())
            self._learn_partition_ids(grid, all_nodes)
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
        self._sampled[PURPOSES[purpose]] = set(chosen)
        return chosen

    def _ordered(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in partition order, so aggregation does not depend on arrival order."""
        return sorted(
            replies,
            key=lambda m: (
                self.partition_ids.get(m.metadata.src_node_id, 0),
                m.metadata.src_node_id,
            ),
        )

    # -- bookkeeping ------------------------------------------------------------

    def _record(self, server_round: int, messages: list[Message], direction: str) -> None:
        for message in messages:
            node = (
                message.metadata.dst_node_id
                if direction == "down"
                else message.metadata.src_node_id
            )
            self.message_log.append(
                MessageEntry(
                    server_round=server_round,
                    message_type=message.metadata.message_type,
                    direction=direction,
                    node_id=node,
                    partition_id=self.partition_ids.get(node, node),
                    num_bytes=message_bytes(message) if message.has_content() else 0,
                )
            )

    def _with_node_config(self, messages: list[Message]) -> list[Message]:
        """``messages`` with :attr:`node_config_fn`'s items in each one's own config."""
        if self.node_config_fn is None:
            return messages
        out = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            extra = self.node_config_fn(
                self.partition_ids.get(node_id, node_id), self.num_partitions
            )
            content = RecordDict(dict(message.content.items()))
            config = content.config_records[self.configrecord_key]
            # records may be shared by every message of a round: a new one per node
            content[self.configrecord_key] = ConfigRecord({**dict(config), **extra})
            out.append(
                Message(
                    content=content, message_type=message.metadata.message_type, dst_node_id=node_id
                )
            )
        return out

    def _sink(self, server_round: int, messages: list[Message]) -> None:
        if self.message_sink is None:
            return
        for message in messages:
            node_id = message.metadata.dst_node_id
            self.message_sink(server_round, self.partition_ids.get(node_id, node_id), message)

    def _mean_bytes(self, server_round: int, message_type: str, direction: str) -> float:
        sizes = [
            e.num_bytes
            for e in self.message_log
            if e.server_round == server_round
            and e.message_type == message_type
            and e.direction == direction
            and e.num_bytes > 0
        ]
        return sum(sizes) / len(sizes) if sizes else 0.0

    def _log_round(self, server_round: int, **values: float) -> None:
        self.round_log.setdefault(server_round, {}).update(values)

    def _train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self._shapes = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        self._global_values = {k: array_values(a) for k, a in arrays.items()}
        self._model_norm = l2_norm(v for v in self._global_values.values() if v.dtype.kind in "fc")
        if self.proxy_evaluate_fn is not None:
            found = self.proxy_evaluate_fn(arrays.to_torch_state_dict())
            self._log_round(server_round, **proxy_metrics([found]))
        # every client gets the exact global model
        self._log_round(server_round, cosine_all=1.0, rel_l2_all=0.0, exposure=1.0)
        return list(self._construct_messages(record, node_ids, MessageType.TRAIN))

    # -- Strategy API -----------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes reproducibly and send each its training message."""
        server_round += self._round_offset
        if self.fraction_train == 0.0:
            return []
        node_ids = self._sample(
            grid, server_round, self.fraction_train, self.min_train_nodes, TRAIN
        )
        started = time.perf_counter()
        config = ConfigRecord({**dict(config), SERVER_ROUND_KEY: server_round})
        messages = self._train_messages(server_round, arrays, config, node_ids)
        messages = self._with_node_config(messages)
        self._record(server_round, messages, "down")
        self._sink(server_round, messages)
        self._log_round(
            server_round,
            num_sampled=len(messages),
            bytes_down=self._mean_bytes(server_round, MessageType.TRAIN, "down"),
            configure_train_seconds=time.perf_counter() - started,
        )
        return messages

    @staticmethod
    def _reject(server_round: int, message: Message, why: str) -> None:
        log(
            WARNING,
            "Round %d: rejected reply from node %d: %s",
            server_round,
            message.metadata.src_node_id,
            why,
        )

    def _checked_model(self, message: Message) -> tuple[RecordDict, float]:
        """A FedAvg reply's arrays, each exactly the global model's shape and dtype."""
        content = message.content
        if self.arrayrecord_key not in content.array_records:
            raise InvalidUpdate(f"reply has no '{self.arrayrecord_key}' ArrayRecord")
        arrays = content.array_records[self.arrayrecord_key]
        if missing := sorted(set(self._shapes) - set(arrays.keys())):
            raise InvalidUpdate(f"missing arrays {missing}")
        if extra := sorted(set(arrays.keys()) - set(self._shapes)):
            raise InvalidUpdate(f"unexpected arrays {extra}")
        checked: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in self._shapes.items():
            values = checked_array(arrays[name], name, shape, dtype)
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                raise InvalidUpdate(f"'{name}' holds NaN or Inf")
            checked[name] = values
        metrics = checked_metrics(message, self.weighted_by_key, self.max_num_examples, True)
        record = RecordDict(
            {
                self.arrayrecord_key: ArrayRecord({k: Array(v) for k, v in checked.items()}),
                METRICS_RECORD: metrics,
            }
        )
        return record, float(metrics[self.weighted_by_key])  # type: ignore[arg-type]

    def _norm_limit(self, message: Message) -> float:
        """The norm a reply's update is bounded by (times ``max_update_norm_ratio``).

        FedAvg's clients hold the global model, so its norm tells them nothing.
        """
        return self._model_norm

    def _norm_bounded(self, server_round: int, items: list[tuple[Message, float]]) -> list[bool]:
        """Which of (reply, update norm) pass the norm bounds (``max_update_norm_ratio``)."""
        ratio = self.max_update_norm_ratio
        keep = [True] * len(items)
        if math.isinf(ratio):
            return keep
        for i, (message, norm) in enumerate(items):
            limit = self._norm_limit(message)
            if not norm <= ratio * limit:
                keep[i] = False
                self._reject(
                    server_round,
                    message,
                    f"update norm {norm:.4g} is more than {ratio:g} times the norm "
                    f"{limit:.4g} of the model the client was sent",
                )
        left = [norm for (_, norm), k in zip(items, keep, strict=True) if k]
        if len(left) < 3:
            return keep
        median = statistics.median(left)
        for i, (message, norm) in enumerate(items):
            if keep[i] and norm > ratio * median:
                keep[i] = False
                self._reject(
                    server_round,
                    message,
                    f"update norm {norm:.4g} is more than {ratio:g} times the round's "
                    f"median {median:.4g}",
                )
        return keep

    def _aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg over the replies that pass :meth:`_checked_model` and the norm bounds."""
        checked: list[tuple[Message, RecordDict]] = []
        for message in replies:
            try:
                record = self._checked_model(message)[0]
                checked.append((message, record))
            except Exception as err:  # one bad reply is skipped, never the round
                self._reject(server_round, message, reason(err))
        norms = [
            l2_norm(
                r[self.arrayrecord_key][k].numpy().astype(np.float64) - v
                for k, v in self._global_values.items()
                if v.dtype.kind in "fc"
            )
            for _, r in checked
        ]
        keep = self._norm_bounded(
            server_round, [(m, n) for (m, _), n in zip(checked, norms, strict=True)]
        )
        records = [r for (_, r), k in zip(checked, keep, strict=True) if k]
        self._log_round(server_round, num_aggregated=float(len(records)))
        if not records:
            log(WARNING, "Round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        arrays = self._as_global(aggregate_arrayrecords(records, self.weighted_by_key))
        if arrays is None:
            self._unchanged(server_round)
            return None, None
        return arrays, self._train_metrics([r[METRICS_RECORD] for r in records])

    def _as_global(self, arrays: ArrayRecord) -> ArrayRecord | None:
        """Flower's aggregate in the global model's dtypes; None if not finite.

        Flower averages integer arrays (e.g. BatchNorm's batch counter) into
        float64: they are rounded back, or every later reply would be refused
        for its dtype.
        """
        out: dict[str, Array] = {}
        for name, array in arrays.items():
            values, dtype = array.numpy(), self._global_values[name].dtype
            if dtype.kind in "fc" and not np.isfinite(values).all():
                return None
            if dtype.kind in "iub":
                values = np.rint(values)
            out[name] = Array(np.array(values, dtype=dtype, order="C"))
        return ArrayRecord(out)

    @staticmethod
    def _unchanged(server_round: int) -> None:
        log(
            WARNING,
            "Round %d: the aggregate is not finite; the global model is unchanged",
            server_round,
        )

    def _train_metrics(self, metrics: list[MetricRecord]) -> MetricRecord | None:
        """``train_metrics_aggr_fn`` over the aggregated replies' checked metrics."""
        return aggregate_metrics(self.train_metrics_aggr_fn, metrics, self.weighted_by_key)

    def _first_sampled(
        self, server_round: int, replies: Iterable[Message], message_type: str
    ) -> list[Message]:
        """One reply per sampled node (the first); replies from others are logged."""
        sampled = self._sampled.get(message_type, set())
        kept: list[Message] = []
        seen: set[int] = set()
        for message in replies:
            node_id = message.metadata.src_node_id
            if node_id not in sampled:
                self._reject(server_round, message, "the node was not sampled this round")
            elif node_id in seen:
                self._reject(server_round, message, "a second reply (the first counts)")
            else:
                seen.add(node_id)
                kept.append(message)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies in partition order; record their sizes and failures."""
        server_round += self._round_offset
        started = time.perf_counter()
        replies = list(replies)
        self._record(server_round, replies, "up")
        replies = self._ordered(self._first_sampled(server_round, replies, MessageType.TRAIN))
        failed = [m for m in replies if m.has_error()]
        for message in failed:
            log(
                WARNING,
                "Round %d: node %d failed and is skipped: %s",
                server_round,
                message.metadata.src_node_id,
                message.error.reason,
            )
        valid = [m for m in replies if not m.has_error()]
        self._log_round(server_round, num_aggregated=float(len(valid)))
        arrays, metrics = self._aggregate_valid(server_round, valid)
        entry = self.round_log[server_round]
        entry["bytes_up"] = self._mean_bytes(server_round, MessageType.TRAIN, "up")
        entry["num_failures"] = entry.get("num_sampled", 0.0) - entry["num_aggregated"]
        if metrics is not None and isinstance(metrics.get(TRAIN_LOSS_KEY), int | float):
            entry["train_loss"] = float(metrics[TRAIN_LOSS_KEY])  # type: ignore[arg-type]
        entry["aggregate_train_seconds"] = time.perf_counter() - started
        return arrays, metrics

    def _evaluate_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, node_ids, MessageType.EVALUATE))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes reproducibly for federated evaluation."""
        server_round += self._round_offset
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(
            grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes, EVALUATE
        )
        config = ConfigRecord({**dict(config), SERVER_ROUND_KEY: server_round})
        messages = self._evaluate_messages(server_round, arrays, config, node_ids)
        messages = self._with_node_config(messages)
        self._record(server_round, messages, "down")
        self._sink(server_round, messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """``evaluate_metrics_aggr_fn`` over the valid evaluate replies.

        Each reply's metrics are checked
        (:func:`fedqsn_flwr.flower.replies.checked_metrics`); a bad reply is
        skipped with a log line. With no valid reply holding examples the round's
        federated evaluation is recorded as missing.
        """
        server_round += self._round_offset
        self._last_round = server_round
        replies = list(replies)
        self._record(server_round, replies, "up")
        replies = self._ordered(self._first_sampled(server_round, replies, MessageType.EVALUATE))
        valid: list[MetricRecord] = []
        for message in replies:
            if message.has_error():
                continue
            try:
                metrics = checked_metrics(
                    message, self.weighted_by_key, self.max_num_examples, False
                )
            except Exception as err:  # one bad reply is skipped, never the round
                self._reject(server_round, message, reason(err))
                continue
            valid.append(metrics)
        aggregated = aggregate_metrics(self.evaluate_metrics_aggr_fn, valid, self.weighted_by_key)
        if aggregated is None:
            log(
                WARNING,
                "Round %d: no evaluate reply with examples: recorded as missing",
                server_round,
            )
            return None
        if isinstance(accuracy := aggregated.get("accuracy"), int | float):
            self._log_round(server_round, client_eval_accuracy=float(accuracy))
        return aggregated
