"""Flower's FedAvg with reproducible sampling, byte accounting and checked replies.

The base of every strategy in this project: :class:`~fedqsn_flwr.flower.strategies.fedqsn.FedQSN`
changes what is sent and how updates are folded in, nothing else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import (
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

from fedqsn_flwr.flower.protocol import METRICS_RECORD, SERVER_ROUND_KEY, TRAIN_LOSS_KEY
from fedqsn_flwr.flower.proxy import array_values
from fedqsn_flwr.flower.replies import (
    checked_metrics,
    checked_model,
    norm_bounded,
    reason,
    reject,
    without_failures,
)
from fedqsn_flwr.flower.strategies.nodes import NodeSampler
from fedqsn_flwr.flower.strategies.records import RoundRecords
from fedqsn_flwr.flower.strategies.resume import EvaluateFn, Resumption
from fedqsn_flwr.flower.strategies.utils import (
    EVALUATE,
    NOT_FINITE,
    TRAIN,
    MessageEntry,
    MessageSink,
    MetricsAggrFn,
    NodeConfigFn,
    StateEvaluateFn,
    aggregate_metrics,
    in_dtypes,
    l2_norm,
    proxy_metrics,
    with_config,
)


class MeasuredFedAvg(FedAvg):
    """Flower's FedAvg with reproducible sampling and byte accounting.

    Aggregation is Flower's own :class:`~flwr.serverapp.strategy.FedAvg`; what
    differs: sampling is seeded and ordered by partition id
    (:class:`~fedqsn_flwr.flower.strategies.nodes.NodeSampler`), every message's
    size is recorded and each round's bytes per client are logged
    (:class:`~fedqsn_flwr.flower.strategies.records.RoundRecords`: ``round_log``,
    ``message_log``), every reply is checked before it counts (a bad one is
    skipped with a log line, never the round: :mod:`fedqsn_flwr.flower.replies`),
    and a run can resume from a checkpoint
    (:class:`~fedqsn_flwr.flower.strategies.resume.Resumption`). Every option is
    keyword-only.

    A subclass changes what is sent and how replies are folded in by overriding
    :meth:`_train_messages`, :meth:`_evaluate_messages` and
    :meth:`_aggregate_valid` (and :meth:`_norm_limit`, the norm an update is
    bounded by).

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
        self.proxy_evaluate_fn = proxy_evaluate_fn
        self.message_sink = message_sink
        self.nodes = NodeSampler(seed=seed, partition_query=partition_query)
        self.records = RoundRecords()
        self.resumption = Resumption()
        self._model_norm = math.inf
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        self._global_values: dict[str, np.ndarray] = {}

    @property
    def partition_ids(self) -> dict[int, int]:
        """Partition id of every node seen (its node id where none was learned)."""
        return self.nodes.partition_ids

    @property
    def round_log(self) -> dict[int, dict[str, float]]:
        """Per round, its figures (:class:`~fedqsn_flwr.flower.strategies.records.RoundRecords`)."""
        return self.records.rounds

    @property
    def message_log(self) -> list[MessageEntry]:
        """One :class:`MessageEntry` (size, node, direction) per message sent or received."""
        return self.records.messages

    # -- checkpoints --------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """The bookkeeping a restarted run needs to continue exactly."""
        return {
            **self.nodes.state(),
            **self.records.state(),
            "completed_rounds": self.resumption.last,
        }

    def restore(
        self, state: Mapping[str, Any], global_state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Take back what :meth:`checkpoint_state` returned (``global_state``: the model's).

        The next :meth:`start` continues after the checkpoint's last round.
        """
        rounds = [int(r) for r in state["round_log"]]
        self.resumption.restore(int(state.get("completed_rounds", max(rounds, default=0))))
        self.nodes.restore(dict(state))
        self.records.restore(dict(state))

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Flower's :meth:`~flwr.serverapp.strategy.Strategy.start`, resumable.

        After :meth:`restore`, ``initial_arrays`` must be the checkpoint's global
        model: Flower's own loop then runs the remaining rounds, numbered from
        the checkpoint on, and the restored model is not evaluated again.
        """
        # partition queries wait as long as a round (at least a minute): a ClientApp
        # that starts slowly on a loaded machine must not lose its partition to a fallback
        self.nodes.query_timeout = max(60.0, timeout)

        def loop(rounds: int, evaluate: EvaluateFn | None) -> Result:
            return super(MeasuredFedAvg, self).start(
                grid, initial_arrays, rounds, timeout, train_config, evaluate_config, evaluate
            )

        return self.resumption.start(
            loop, initial_arrays, num_rounds=num_rounds, evaluate_fn=evaluate_fn
        )

    # -- messages ---------------------------------------------------------------

    def _train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """The round's training messages, one per node (FedAvg: the global model)."""
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self._shapes = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        self._global_values = {k: array_values(a) for k, a in arrays.items()}
        self._model_norm = l2_norm(v for v in self._global_values.values() if v.dtype.kind in "fc")
        if self.proxy_evaluate_fn is not None:
            found = self.proxy_evaluate_fn(arrays.to_torch_state_dict())
            self.records.add(server_round, **proxy_metrics([found]))
        # every client gets the exact global model
        self.records.add(server_round, cosine_all=1.0, rel_l2_all=0.0, exposure=1.0)
        return list(self._construct_messages(record, node_ids, MessageType.TRAIN))

    def _evaluate_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """The round's evaluation messages, one per node (FedAvg: the global model)."""
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, node_ids, MessageType.EVALUATE))

    def _outgoing(self, server_round: int, messages: list[Message]) -> list[Message]:
        """``messages`` with each node's own config; recorded and given to the sink."""
        if (extra := self.node_config_fn) is not None:
            partitions = self.nodes.num_partitions
            messages = [
                with_config(
                    m,
                    self.configrecord_key,
                    extra(self.nodes.partition(m.metadata.dst_node_id), partitions),
                )
                for m in messages
            ]
        self.records.record(server_round, messages, "down", self.nodes.partition)
        for message in messages if self.message_sink is not None else []:
            node_id = message.metadata.dst_node_id
            self.message_sink(server_round, self.nodes.partition(node_id), message)
        return messages

    def _round_start(
        self, grid: Grid, server_round: int, config: ConfigRecord, purpose: int
    ) -> tuple[list[int], ConfigRecord]:
        """The nodes sampled for ``purpose`` (TRAIN or EVALUATE) and the round's config."""
        train = purpose == TRAIN
        node_ids = self.nodes.sample(
            grid,
            server_round,
            fraction=self.fraction_train if train else self.fraction_evaluate,
            min_nodes=self.min_train_nodes if train else self.min_evaluate_nodes,
            min_available=self.min_available_nodes,
            purpose=purpose,
        )
        return node_ids, ConfigRecord({**dict(config), SERVER_ROUND_KEY: server_round})

    # -- Strategy API -----------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes reproducibly and send each its training message."""
        server_round = self.resumption.real(server_round)
        if self.fraction_train == 0.0:
            return []
        node_ids, config = self._round_start(grid, server_round, config, TRAIN)
        started = time.perf_counter()
        messages = self._outgoing(
            server_round, self._train_messages(server_round, arrays, config, node_ids)
        )
        self.records.add(
            server_round,
            num_sampled=len(messages),
            bytes_down=self.records.mean_bytes(server_round, MessageType.TRAIN, "down"),
            configure_train_seconds=time.perf_counter() - started,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies in partition order; record their sizes and failures."""
        server_round = self.resumption.real(server_round)
        started = time.perf_counter()
        replies = list(replies)
        self.records.record(server_round, replies, "up", self.nodes.partition)
        replies = self.nodes.replies(server_round, replies, MessageType.TRAIN)
        valid = without_failures(server_round, replies)
        self.records.add(server_round, num_aggregated=float(len(valid)))
        arrays, metrics = self._aggregate_valid(server_round, valid)
        entry = self.round_log[server_round]
        entry["bytes_up"] = self.records.mean_bytes(server_round, MessageType.TRAIN, "up")
        entry["num_failures"] = entry.get("num_sampled", 0.0) - entry["num_aggregated"]
        if metrics is not None and isinstance(metrics.get(TRAIN_LOSS_KEY), int | float):
            entry["train_loss"] = float(metrics[TRAIN_LOSS_KEY])  # type: ignore[arg-type]
        entry["aggregate_train_seconds"] = time.perf_counter() - started
        self.records.report_bytes(server_round)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes reproducibly for federated evaluation."""
        server_round = self.resumption.real(server_round)
        if self.fraction_evaluate == 0.0:
            return []
        node_ids, config = self._round_start(grid, server_round, config, EVALUATE)
        return self._outgoing(
            server_round, self._evaluate_messages(server_round, arrays, config, node_ids)
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """``evaluate_metrics_aggr_fn`` over the valid evaluate replies.

        Each reply's metrics are checked
        (:func:`fedqsn_flwr.flower.replies.checked_metrics`); a bad reply is
        skipped with a log line. With no valid reply holding examples the round's
        federated evaluation is recorded as missing.
        """
        server_round = self.resumption.real(server_round)
        self.resumption.last = server_round
        replies = list(replies)
        self.records.record(server_round, replies, "up", self.nodes.partition)
        valid: list[MetricRecord] = []
        for message in self.nodes.replies(server_round, replies, MessageType.EVALUATE):
            if message.has_error():
                continue
            try:
                valid.append(self._checked_metrics(message, train=False))
            except Exception as err:  # one bad reply is skipped, never the round
                reject(server_round, message, reason(err))
        aggregated = aggregate_metrics(self.evaluate_metrics_aggr_fn, valid, self.weighted_by_key)
        if aggregated is None:
            log(
                WARNING,
                "Round %d: no evaluate reply with examples: recorded as missing",
                server_round,
            )
            return None
        if isinstance(accuracy := aggregated.get("accuracy"), int | float):
            self.records.add(server_round, client_eval_accuracy=float(accuracy))
        return aggregated

    # -- replies ----------------------------------------------------------------

    def _checked_metrics(self, message: Message, *, train: bool) -> MetricRecord:
        return checked_metrics(
            message,
            weight_key=self.weighted_by_key,
            max_examples=self.max_num_examples,
            train=train,
        )

    def _update_norm(self, record: RecordDict) -> float:
        arrays = record.array_records[self.arrayrecord_key]
        return l2_norm(
            arrays[k].numpy().astype(np.float64) - v
            for k, v in self._global_values.items()
            if v.dtype.kind in "fc"
        )

    def _norm_limit(self, message: Message) -> float:
        """The norm a reply's update is bounded by (times ``max_update_norm_ratio``).

        FedAvg's clients hold the global model, so its norm tells them nothing.
        """
        return self._model_norm

    def _norm_bounded(self, server_round: int, items: list[tuple[Message, float]]) -> list[bool]:
        """Which of (reply, update norm) pass the norm bounds (``max_update_norm_ratio``)."""
        bounded = [(m, norm, self._norm_limit(m)) for m, norm in items]
        return norm_bounded(server_round, bounded, self.max_update_norm_ratio)

    def _aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg over the replies whose arrays and metrics pass the checks and norm bounds."""
        checked: list[tuple[Message, RecordDict, float]] = []
        for message in replies:
            try:
                record = checked_model(
                    message,
                    self.arrayrecord_key,
                    self._shapes,
                    metrics=self._checked_metrics(message, train=True),
                )
                checked.append((message, record, self._update_norm(record)))
            except Exception as err:  # one bad reply is skipped, never the round
                reject(server_round, message, reason(err))
        keep = self._norm_bounded(server_round, [(m, norm) for m, _, norm in checked])
        records = [r for (_, r, _), k in zip(checked, keep, strict=True) if k]
        self.records.add(server_round, num_aggregated=float(len(records)))
        if not records:
            log(WARNING, "Round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        dtypes = {k: v.dtype for k, v in self._global_values.items()}
        arrays = in_dtypes(aggregate_arrayrecords(records, self.weighted_by_key), dtypes)
        if arrays is None:
            log(WARNING, NOT_FINITE, server_round)
            return None, None
        metrics = [r[METRICS_RECORD] for r in records]
        return arrays, self._train_metrics(metrics)  # type: ignore[arg-type]

    def _train_metrics(self, metrics: list[MetricRecord]) -> MetricRecord | None:
        """``train_metrics_aggr_fn`` over the aggregated replies' checked metrics."""
        return aggregate_metrics(self.train_metrics_aggr_fn, metrics, self.weighted_by_key)
