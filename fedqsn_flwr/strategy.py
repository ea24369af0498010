"""Flower strategies: FedQSN, and Flower's FedAvg with the same bookkeeping.

Both sample nodes reproducibly (seeded, by partition id rather than by Flower's
random node ids) and record the serialized size of every message they send and
receive, so FedQSN and its baseline can be compared byte for byte.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
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
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

from .aggregation import ClientUpdate, apply_updates
from .feedback import (
    ClientFeedback,
    GradientFn,
    apply_feedback,
    feedback_direction,
    hidden_slices,
    select_units,
    server_hidden,
)
from .masking import (
    MaskPolicy,
    UnitMask,
    apply_mask,
    derive_seed,
    draw_client_mask,
    draw_server_mask,
)
from .privacy import ExposureTracker, SimilarityReference, unit_factors
from .proxy import (
    FEEDBACK_RECORD,
    LAYOUT_RECORD,
    PROXY_RECORD,
    UPDATE_BIT_WIDTHS,
    UPDATE_RECORD,
    InvalidUpdate,
    PackedTensor,
    ProxySpec,
    array_values,
    decode_feedback,
    decode_proxy,
    decode_update,
    encode_proxy,
    hidden_units,
    iter_packed,
    proxy_layout,
)
from .replies import (
    METRICS_RECORD,
    PARTITION_ID_KEY,
    checked_array,
    evaluate_metrics,
    partition_claim,
    reason,
    train_loss,
    train_weight,
)
from .secret import new_secret, secret_seed

#: Called with a model state the clients receive; returns its accuracy.
StateEvaluateFn = Callable[[Mapping[str, torch.Tensor]], float]
#: Called with (server round, partition id, message) for every message to a client.
MessageSink = Callable[[int, int, Message], None]

_TRAIN, _EVALUATE = 1, 2
_PURPOSES = {_TRAIN: MessageType.TRAIN, _EVALUATE: MessageType.EVALUATE}


def _norm(arrays: Iterable[np.ndarray]) -> float:
    """L2 norm over several arrays, in float64 (inf when any value is not finite)."""
    total = 0.0
    for values in arrays:
        total += float(np.square(np.asarray(values, dtype=np.float64)).sum())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def message_bytes(message: Message) -> int:
    """Size of ``message`` serialized as Flower's protobuf ``Message``."""
    return message_to_proto(message).ByteSize()


@dataclass(frozen=True)
class MessageEntry:
    """One message sent or received by the strategy."""

    server_round: int
    message_type: str
    direction: str  # "down" (server -> client) or "up"
    node_id: int
    partition_id: int
    num_bytes: int


class MeasuredFedAvg(FedAvg):
    """Flower's FedAvg with reproducible sampling and byte accounting.

    Aggregation is Flower's own :class:`~flwr.serverapp.strategy.FedAvg`; only
    sampling (seeded, ordered by partition id) and logging differ.

    Parameters
    ----------
    seed : int (default: 0)
        Seed of node sampling (and, in subclasses, of masks).
    proxy_evaluate_fn : StateEvaluateFn, optional
        Called in ``configure_train`` on the model each client receives, decoded
        from the actual message; the mean goes into ``round_log[r]["proxy_accuracy"]``.
    message_sink : MessageSink, optional
        Called with ``(server_round, partition_id, message)`` for every training
        and evaluation message sent (e.g. to save what clients received, for the
        attacks).
    max_num_examples : float (default: inf)
        Replies claiming more examples than this are rejected.
    max_update_norm_ratio : float (default: 10.0)
        Robustness to a single hostile client: an update (reply minus what was
        sent, in global units) whose L2 norm exceeds this many times the global
        model's norm is rejected, and with at least 3 replies left, so is one
        exceeding this many times the round's median update norm. ``inf``: off.
    **fedavg_kwargs
        Passed to :class:`~flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``,
        ``min_available_nodes``, ...).

    """

    def __init__(
        self,
        seed: int = 0,
        proxy_evaluate_fn: StateEvaluateFn | None = None,
        message_sink: MessageSink | None = None,
        max_num_examples: float = math.inf,
        max_update_norm_ratio: float = 10.0,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        if not max_update_norm_ratio > 0:
            raise ValueError(f"max_update_norm_ratio must be > 0, got {max_update_norm_ratio}")
        self.seed = seed
        self.max_num_examples = max_num_examples
        self.max_update_norm_ratio = max_update_norm_ratio
        self._model_norm = math.inf
        #: Nodes whose partition claim was refused: they are never sampled.
        self.refused: dict[int, str] = {}
        self._sampled: dict[str, set[int]] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        self.proxy_evaluate_fn = proxy_evaluate_fn
        self.message_sink = message_sink
        self.partition_ids: dict[int, int] = {}
        self.num_partitions = 0  # as reported by the nodes (0: unknown)
        self.message_log: list[MessageEntry] = []
        self.round_log: dict[int, dict[str, float]] = {}

    # -- checkpoints --------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """The bookkeeping a restarted run needs to continue exactly."""
        return {
            "partition_ids": dict(self.partition_ids),
            "num_partitions": self.num_partitions,
            "round_log": {r: dict(v) for r, v in self.round_log.items()},
            "message_log": [asdict(e) for e in self.message_log],
        }

    def restore(
        self, state: Mapping[str, Any], global_state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Take back what :meth:`checkpoint_state` returned (``global_state``: the model's)."""
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
        first_round: int = 1,
        resumed: bool = False,
    ) -> Result:
        """Flower's round loop; ``resumed`` continues after a checkpoint.

        ``initial_arrays`` are then the global model after round ``first_round - 1``
        (round 0: the starting model, already evaluated: it is not evaluated again).
        """
        if first_round <= 1 and not resumed:
            return super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
        log(INFO, "Resuming %s after round %d", type(self).__name__, first_round - 1)
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            messages = self.configure_train(server_round, arrays, train_config, grid)
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
            new_arrays, metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            messages = self.configure_evaluate(server_round, arrays, evaluate_config, grid)
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
            if (metrics := self.aggregate_evaluate(server_round, replies)) is not None:
                result.evaluate_metrics_clientapp[server_round] = metrics
            if evaluate_fn and (metrics := evaluate_fn(server_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[server_round] = metrics
        return result

    # -- sampling ---------------------------------------------------------------

    def _learn_partition_ids(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes not seen before for their partition id (falls back to node id)."""
        unknown = [n for n in node_ids if n not in self.partition_ids]
        if not unknown:
            return
        queries = [
            Message(
                content=RecordDict({"config": ConfigRecord({"ask": PARTITION_ID_KEY})}),
                message_type=MessageType.QUERY,
                dst_node_id=node_id,
            )
            for node_id in unknown
        ]
        answered: set[int] = set()
        for reply in grid.send_and_receive(queries, timeout=60):
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
            if owner is not None and owner != node_id:
                self._refuse(node_id, f"partition-id {partition} is already node {owner}'s")
                continue
            self.partition_ids[node_id] = partition
            self.num_partitions = max(self.num_partitions, partitions)
        for node_id in unknown:
            if node_id not in self.refused:
                self.partition_ids.setdefault(node_id, node_id)

    def _refuse(self, node_id: int, why: str) -> None:
        self.refused[node_id] = why
        log(WARNING, "Node %d is refused and never sampled: %s", node_id, why)

    def _sample(
        self, grid: Grid, server_round: int, fraction: float, min_nodes: int, purpose: int
    ) -> list[int]:
        wanted = max(self.min_available_nodes, min_nodes)
        while len(all_nodes := sorted(grid.get_node_ids())) < wanted:
            log(INFO, "Waiting for nodes: %d connected (need %d)", len(all_nodes), wanted)
            time.sleep(1)
        self._learn_partition_ids(grid, all_nodes)
        allowed = [n for n in all_nodes if n not in self.refused]
        ordered = sorted(allowed, key=lambda n: (self.partition_ids[n], n))
        size = min(len(ordered), max(int(len(ordered) * fraction), min_nodes))
        rng = random.Random(derive_seed("sampling", self.seed, server_round, purpose))
        chosen = sorted(rng.sample(ordered, size), key=ordered.index)
        log(INFO, "Round %d: sampled %d of %d nodes", server_round, size, len(ordered))
        self._sampled[_PURPOSES[purpose]] = set(chosen)
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
        self._model_norm = _norm(v for v in self._global_values.values() if v.dtype.kind in "fc")
        if self.proxy_evaluate_fn is not None:
            accuracy = self.proxy_evaluate_fn(arrays.to_torch_state_dict())
            self._log_round(server_round, proxy_accuracy=accuracy)
        # every client gets the exact global model
        self._log_round(server_round, cosine_all=1.0, rel_l2_all=0.0, exposure=1.0)
        return list(self._construct_messages(record, node_ids, MessageType.TRAIN))

    # -- Strategy API -----------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes reproducibly and send each its training message."""
        if self.fraction_train == 0.0:
            return []
        node_ids = self._sample(
            grid, server_round, self.fraction_train, self.min_train_nodes, _TRAIN
        )
        started = time.perf_counter()
        config = ConfigRecord({**dict(config), "server-round": server_round})
        messages = self._train_messages(server_round, arrays, config, node_ids)
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
        weight = train_weight(message, self.weighted_by_key, self.max_num_examples)
        metrics = {self.weighted_by_key: weight}
        loss = train_loss(message)
        if loss is not None:
            metrics["train-loss"] = loss
        record = RecordDict(
            {
                self.arrayrecord_key: ArrayRecord({k: Array(v) for k, v in checked.items()}),
                METRICS_RECORD: MetricRecord(metrics),
            }
        )
        return record, weight

    def _norm_bounded(self, server_round: int, items: list[tuple[Message, float]]) -> list[bool]:
        """Which of (reply, update norm) pass the norm bounds (``max_update_norm_ratio``)."""
        ratio = self.max_update_norm_ratio
        keep = [True] * len(items)
        if math.isinf(ratio):
            return keep
        for i, (message, norm) in enumerate(items):
            if not norm <= ratio * self._model_norm:
                keep[i] = False
                self._reject(
                    server_round,
                    message,
                    f"update norm {norm:.4g} is more than {ratio:g} times the global "
                    f"model's norm {self._model_norm:.4g}",
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
                checked.append((message, self._checked_model(message)[0]))
            except Exception as err:  # one bad reply is skipped, never the round
                self._reject(server_round, message, reason(err))
        norms = [
            _norm(
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
        arrays = aggregate_arrayrecords(records, self.weighted_by_key)
        with_loss = [r for r in records if "train-loss" in r[METRICS_RECORD]]
        total = sum(float(r[METRICS_RECORD][self.weighted_by_key]) for r in with_loss)
        loss = (
            sum(
                float(r[METRICS_RECORD]["train-loss"])
                * float(r[METRICS_RECORD][self.weighted_by_key])
                for r in with_loss
            )
            / total
            if total
            else None
        )
        return arrays, MetricRecord({"train-loss": loss} if loss is not None else {})

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
        if metrics is not None and "train-loss" in metrics:
            entry["train_loss"] = float(metrics["train-loss"])
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
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(
            grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes, _EVALUATE
        )
        config = ConfigRecord({**dict(config), "server-round": server_round})
        messages = self._evaluate_messages(server_round, arrays, config, node_ids)
        self._record(server_round, messages, "down")
        self._sink(server_round, messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted loss and accuracy of the valid evaluate replies.

        Each reply is checked (:func:`fedqsn_flwr.replies.evaluate_metrics`); a
        bad one is skipped with a log line. With no valid reply holding
        examples the round's federated evaluation is recorded as missing.
        """
        replies = list(replies)
        self._record(server_round, replies, "up")
        replies = self._ordered(self._first_sampled(server_round, replies, MessageType.EVALUATE))
        total = loss_sum = correct = 0.0
        for message in replies:
            if message.has_error():
                continue
            try:
                examples, loss, accuracy = evaluate_metrics(message, self.max_num_examples)
            except Exception as err:  # one bad reply is skipped, never the round
                self._reject(server_round, message, reason(err))
                continue
            total += examples
            loss_sum += loss * examples
            correct += accuracy * examples
        if total == 0:
            log(
                WARNING,
                "Round %d: no evaluate reply with examples: recorded as missing",
                server_round,
            )
            return None
        accuracy = correct / total
        self._log_round(server_round, client_eval_accuracy=accuracy)
        return MetricRecord({"loss": loss_sum / total, "accuracy": accuracy})


class FedQSN(MeasuredFedAvg):
    """FedQSN: every client trains a private, masked and quantized proxy.

    The server keeps the full-precision global model. Each round it sends every
    sampled client a *proxy*: the model with the units of the **server mask**
    (ratio ``server_mask_ratio`` = the paper's p1, drawn once per run) and of a
    fresh **client mask** (ratio ``client_mask_ratio`` = p2, drawn among the
    server-visible units for each client and round) removed, visible units scaled
    by ``num_units / num_visible``, and every value quantized to ``bit_width``-bit
    NormalFloat codes in blocks of ``block_size``. Clients return the update of
    the units they saw; each position of the global model moves by the weighted
    mean of the updates of the clients that saw it.

    Parameters
    ----------
    policy : MaskPolicy
        Which tensors are masked (and along which axis) and quantized.
    server_mask_ratio : float (default: 0.1)
        p1, share of units hidden from every client for the whole run.
    client_mask_ratio : float (default: 0.1)
        p2, share of server-visible units hidden per client per round.
    bit_width : int | None (default: 4)
        Bits per quantized value (2..8); None sends float32 proxies.
    block_size : int (default: 64)
        Values per absmax quantization block.
    seed : int (default: 0)
        Seed of node sampling (public: clients may know it).
    proxy_evaluate_fn : StateEvaluateFn, optional
        Called on every proxy decoded from its message (what the client gets).
    message_sink : MessageSink, optional
        Called with every training message sent (see :class:`MeasuredFedAvg`).
    max_num_examples : float (default: inf)
        Replies claiming more training examples than this are rejected.
    max_update_norm_ratio : float (default: 10.0)
        See :class:`MeasuredFedAvg` (updates compared in global units).
    update_bit_width : int (default: 16)
        How clients encode their updates: 32 (float32), 16 (float16: half the
        bytes, no accuracy cost measured) or 2..8 (NF-k codes in blocks of
        ``block_size``); see :mod:`fedqsn_flwr.proxy`.
    device : str | torch.device (default: "cpu")
        Where proxies are built and updates aggregated (e.g. ``"cuda"``). The
        global model handed back to Flower is always on the CPU.
    privacy_metrics : bool (default: True)
        Decode every proxy as its client will and log its similarity to the
        global model and the exposure (``round_log``). Costs about one decode
        per message on the server.
    server_secret : bytes, optional
        32 bytes no client can obtain (:mod:`fedqsn_flwr.secret`): the server
        mask and every client mask derive from it. Default: fresh random bytes,
        so masks differ from run to run; pass one to reproduce a run.
    hidden_feedback : bool (default: False)
        Step the server-hidden units with the clients' gradients at the hidden
        positions and a control variate from the server's own data
        (:mod:`fedqsn_flwr.feedback`); needs ``feedback_gradient_fn`` and a
        train config with ``learning-rate``, ``local-epochs`` and ``batch-size``.
    feedback_gradient_fn : GradientFn, optional
        Mean loss gradient of a model state on the server's own data.
    feedback_step : float (default: 1.0)
        Step on hidden units in units of learning rate x local steps.
    feedback_clip : float (default: 5.0)
        A client's hidden gradient is clipped to this many times the norm of the
        server's gradient of the same proxy on its own data.
    **fedavg_kwargs
        Sampling settings passed to :class:`~flwr.serverapp.strategy.FedAvg`.

    """

    def __init__(
        self,
        policy: MaskPolicy,
        server_mask_ratio: float = 0.1,
        client_mask_ratio: float = 0.1,
        bit_width: int | None = 4,
        block_size: int = 64,
        seed: int = 0,
        proxy_evaluate_fn: StateEvaluateFn | None = None,
        message_sink: MessageSink | None = None,
        max_num_examples: float = math.inf,
        max_update_norm_ratio: float = 10.0,
        update_bit_width: int = 16,
        device: str | torch.device = "cpu",
        privacy_metrics: bool = True,
        server_secret: bytes | None = None,
        hidden_feedback: bool = False,
        feedback_gradient_fn: GradientFn | None = None,
        feedback_step: float = 1.0,
        feedback_clip: float = 5.0,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(
            seed=seed,
            proxy_evaluate_fn=proxy_evaluate_fn,
            message_sink=message_sink,
            max_num_examples=max_num_examples,
            max_update_norm_ratio=max_update_norm_ratio,
            **fedavg_kwargs,
        )
        for name, ratio in (
            ("server_mask_ratio", server_mask_ratio),
            ("client_mask_ratio", client_mask_ratio),
        ):
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {ratio}")
        if update_bit_width not in UPDATE_BIT_WIDTHS:
            raise ValueError(
                f"update_bit_width must be one of {UPDATE_BIT_WIDTHS}, got {update_bit_width}"
            )
        self.update_bit_width = update_bit_width
        self.device = torch.device(device)
        self.privacy_metrics = privacy_metrics
        self.policy = policy
        self.server_mask_ratio = server_mask_ratio
        self.client_mask_ratio = client_mask_ratio
        self.bit_width = bit_width
        self.block_size = block_size
        if hidden_feedback and feedback_gradient_fn is None:
            raise ValueError(
                "hidden_feedback needs data of the server's own: pass feedback_gradient_fn "
                "(the mean loss gradient of a state on that data)"
            )
        if hidden_feedback and (not policy.unit_axes or server_mask_ratio == 0.0):
            raise ValueError("hidden_feedback needs a server mask (masked tensors and p1 > 0)")
        self.server_secret = server_secret if server_secret is not None else new_secret()
        self.server_mask: UnitMask = draw_server_mask(
            policy, server_mask_ratio, secret_seed(self.server_secret, "server-mask")
        )
        self.hidden_feedback = hidden_feedback
        self.feedback_gradient_fn = feedback_gradient_fn
        self.feedback_step = feedback_step
        self.feedback_clip = feedback_clip
        self._server_hidden = server_hidden(policy, self.server_mask)
        self._references: dict[int, dict[str, torch.Tensor]] = {}
        self._feedback: dict[int, ClientFeedback] = {}
        self._full_gradient: dict[str, torch.Tensor] = {}
        self._local_steps: Callable[[float], float] | None = None
        self._learning_rate = 0.0
        self._global: dict[str, torch.Tensor] = {}
        self._sent: dict[int, ProxySpec] = {}
        self._exposure: ExposureTracker | None = None

    def summary(self) -> None:
        """Log the FedQSN settings and FedAvg's sampling settings."""
        log(INFO, "\t├──> FedQSN:")
        log(INFO, "\t│\t├── server mask ratio p1: %.3f", self.server_mask_ratio)
        log(INFO, "\t│\t├── client mask ratio p2: %.3f", self.client_mask_ratio)
        log(INFO, "\t│\t├── bit width: %s, block size: %d", self.bit_width, self.block_size)
        log(INFO, "\t│\t├── update bit width: %d, device: %s", self.update_bit_width, self.device)
        log(INFO, "\t│\t├── hidden-unit feedback: %s", self.hidden_feedback)
        log(INFO, "\t│\t└── masked tensors: %s", ", ".join(sorted(self.policy.unit_axes)))
        super().summary()

    def client_mask(self, server_round: int, partition_id: int, purpose: int = _TRAIN) -> UnitMask:
        """The client mask of one client (by partition id) in one round."""
        seed = secret_seed(self.server_secret, "client-mask", server_round, purpose, partition_id)
        return draw_client_mask(self.server_mask, self.client_mask_ratio, seed)

    def server_model(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The paper's *server model*: the global model under the server mask only."""
        return apply_mask(arrays.to_torch_state_dict(), self.policy, self.server_mask)

    def _proxy_message(
        self,
        state: Mapping[str, torch.Tensor],
        server_round: int,
        node_id: int,
        config: ConfigRecord,
        message_type: str,
        purpose: int,
        layout: ConfigRecord,
    ) -> tuple[Message, ProxySpec]:
        visible = self.client_mask(server_round, self.partition_ids[node_id], purpose)
        proxy, layout, spec = encode_proxy(
            state,
            self.policy,
            visible,
            self.bit_width,
            self.block_size,
            self.update_bit_width,
            layout,
        )
        content = RecordDict(
            {PROXY_RECORD: proxy, LAYOUT_RECORD: layout, self.configrecord_key: config}
        )
        return Message(content=content, message_type=message_type, dst_node_id=node_id), spec

    def _layout(self, state: Mapping[str, torch.Tensor]) -> ConfigRecord:
        # The same for every client of a round; Flower's records may be shared.
        return proxy_layout(
            state, self.policy, self.bit_width, self.block_size, self.update_bit_width
        )

    def _exposed_pieces(self, arrays: ArrayRecord, layout: ConfigRecord) -> Iterator[PackedTensor]:
        """The message's tensors, still packed, each marked exposed as it comes by."""
        assert self._exposure is not None
        for piece in iter_packed(arrays, layout):
            self._exposure.add_tensor(piece.name, piece.axis, piece.units)
            yield piece

    def _on_device(
        self, arrays: ArrayRecord, state: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        state = state if state is not None else arrays.to_torch_state_dict()
        return {k: v.to(self.device) for k, v in state.items()}

    def _train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        self._global = arrays.to_torch_state_dict()
        self._model_norm = _norm(t.numpy() for t in self._global.values() if t.is_floating_point())
        if self.hidden_feedback:
            self._prepare_feedback(config)
        if self._exposure is None:
            self._exposure = ExposureTracker(self._global, self.policy)
        state = self._on_device(arrays, self._global)
        layout = self._layout(state)
        reference = (
            SimilarityReference(self._global, list(self.policy.unit_axes))
            if self.privacy_metrics
            else None
        )
        messages: list[Message] = []
        self._sent = {}
        sims: dict[str, float] = {}
        accuracies: list[float] = []
        # One proxy at a time: only the messages (what Flower sends) pile up, not
        # the decoded dense proxies, which are as large as the model each.
        for node_id in node_ids:
            message, self._sent[node_id] = self._proxy_message(
                state, server_round, node_id, config, MessageType.TRAIN, _TRAIN, layout
            )
            messages.append(message)
            if self.hidden_feedback:
                self._references[node_id] = self._reference_gradient(message)
            if not self.privacy_metrics and self.proxy_evaluate_fn is None:
                continue
            # Everything below looks at what the message carries, decoded as a client would.
            sent, layout = message.content[PROXY_RECORD], message.content[LAYOUT_RECORD]
            if self.proxy_evaluate_fn is None:
                # straight from the codes, one tensor at a time: the metrics of a
                # large model's proxy need no decoded copy of it
                assert reference is not None
                found = reference.compare_packed(
                    self._exposed_pieces(sent, layout),
                    int(layout["bit-width"]),
                    int(layout["block-size"]),
                )
            else:
                proxy = decode_proxy(sent, layout)
                accuracies.append(self.proxy_evaluate_fn(proxy.state))
                if reference is None:
                    continue
                found = reference(proxy.state, unit_factors(proxy))
                self._exposure.add(proxy)
            for key, value in found.items():
                sims[key] = sims.get(key, 0.0) + value / len(node_ids)
        if messages and self.privacy_metrics:
            self._log_round(server_round, **sims, exposure=self._exposure.exposure)
        if accuracies:
            self._log_round(server_round, proxy_accuracy=sum(accuracies) / len(accuracies))
        return messages

    def _prepare_feedback(self, config: ConfigRecord) -> None:
        """The round's full-model gradient and step settings (hidden-unit feedback)."""
        missing = [k for k in ("learning-rate", "local-epochs", "batch-size") if k not in config]
        if missing:
            raise ValueError(
                f"hidden_feedback needs the train config to hold {missing} "
                "(the step on hidden units is learning rate x local steps)"
            )
        epochs, batch = int(config["local-epochs"]), max(1, int(config["batch-size"]))
        self._learning_rate = float(config["learning-rate"])
        self._local_steps = lambda examples: epochs * math.ceil(examples / batch)
        assert self.feedback_gradient_fn is not None
        gradient = self.feedback_gradient_fn(self._global)
        self._full_gradient = hidden_slices(gradient, self.policy, self._server_hidden)
        self._references = {}
        self._feedback = {}

    def _reference_gradient(self, message: Message) -> dict[str, torch.Tensor]:
        """g_p: the gradient of the proxy in ``message`` on the server's own data."""
        assert self.feedback_gradient_fn is not None
        proxy = decode_proxy(message.content[PROXY_RECORD], message.content[LAYOUT_RECORD])
        gradient = self.feedback_gradient_fn(proxy.state)
        return hidden_slices(gradient, self.policy, self._server_hidden)

    def _client_feedback(
        self, node_id: int, content: RecordDict, spec: ProxySpec, weight: float
    ) -> ClientFeedback:
        """Validate a reply's feedback; its slices at the server-hidden units."""
        if FEEDBACK_RECORD not in content.array_records:
            raise InvalidUpdate(f"reply has no '{FEEDBACK_RECORD}' ArrayRecord")
        hidden = decode_feedback(content.array_records[FEEDBACK_RECORD], spec, self.policy)
        gradient = {}
        for name, units in self._server_hidden.items():
            if not units.numel():
                continue
            among = hidden_units(self.policy.unit_counts[name], spec.visible[name])
            gradient[name] = select_units(hidden[name], self.policy.unit_axes[name], among, units)
        return ClientFeedback(gradient, self._references[node_id], weight)

    def _with_feedback(
        self, state: dict[str, torch.Tensor], accepted: list[tuple[Message, ClientUpdate]]
    ) -> dict[str, torch.Tensor]:
        """``state`` with its server-hidden units stepped by the round's feedback."""
        feedback = [self._feedback[m.metadata.src_node_id] for m, _ in accepted]
        if not feedback or self._local_steps is None:
            return state
        total = sum(f.weight for f in feedback)
        steps = sum(self._local_steps(f.weight) * f.weight for f in feedback) / total
        direction = feedback_direction(feedback, self._full_gradient, self.feedback_clip)
        step = self.feedback_step * self._learning_rate * steps
        return apply_feedback(state, self.policy, self._server_hidden, direction, step)

    def checkpoint_state(self) -> dict[str, Any]:
        """Adds which parameters clients have seen (exposure) to the base state."""
        state = super().checkpoint_state()
        if self._exposure is not None:
            state["exposure_seen"] = {n: m.clone() for n, m in self._exposure.seen.items()}
        return state

    def restore(
        self, state: Mapping[str, Any], global_state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Take back a checkpoint; ``global_state`` shapes the exposure tracker."""
        super().restore(state)
        if "exposure_seen" in state and global_state is not None:
            self._exposure = ExposureTracker(global_state, self.policy)
            self._exposure.seen = {n: m.clone() for n, m in state["exposure_seen"].items()}

    @property
    def exposure_bound(self) -> float:
        """The most exposure the server mask allows (see :mod:`fedqsn_flwr.privacy`)."""
        if self._exposure is None:
            raise RuntimeError("no proxy has been sent yet")
        return self._exposure.bound(self.server_mask_ratio)

    def _evaluate_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        state = self._on_device(arrays)
        layout = self._layout(state)
        messages = []
        for node_id in node_ids:
            message, _ = self._proxy_message(
                state, server_round, node_id, config, MessageType.EVALUATE, _EVALUATE, layout
            )
            messages.append(message)
            if self.privacy_metrics and self._exposure is not None:
                # evaluation proxies carry other client masks: they count as exposed too
                # (marking them needs the units each carries, not the decoded values)
                content = message.content
                for _ in self._exposed_pieces(content[PROXY_RECORD], content[LAYOUT_RECORD]):
                    pass
        if messages and self.privacy_metrics and self._exposure is not None:
            self._log_round(server_round, exposure=self._exposure.exposure)
        return messages

    def _without_outliers(
        self, server_round: int, accepted: list[tuple[Message, ClientUpdate]]
    ) -> list[tuple[Message, ClientUpdate]]:
        """Drop updates beyond the norm bounds (:meth:`MeasuredFedAvg._norm_bounded`)."""
        norms = [
            math.sqrt(sum(float(d.double().pow(2).sum()) for d in u.deltas.values()))
            for _, u in accepted
        ]
        keep = self._norm_bounded(
            server_round, [(m, n) for (m, _), n in zip(accepted, norms, strict=True)]
        )
        return [pair for pair, k in zip(accepted, keep, strict=True) if k]

    def _client_update(self, message: Message) -> ClientUpdate:
        """Validate one reply and turn it into a :class:`ClientUpdate`."""
        node_id = message.metadata.src_node_id
        spec = self._sent.get(node_id)
        if spec is None:
            raise InvalidUpdate("no proxy was sent to this node in this round")
        content = message.content
        if UPDATE_RECORD not in content.array_records:
            raise InvalidUpdate(f"reply has no '{UPDATE_RECORD}' ArrayRecord")
        weight = train_weight(message, self.weighted_by_key, self.max_num_examples)
        deltas = decode_update(content.array_records[UPDATE_RECORD], spec, self.policy)
        if self.hidden_feedback:
            self._feedback[node_id] = self._client_feedback(node_id, content, spec, float(weight))
        return ClientUpdate(deltas=deltas, visible=spec.visible, weight=float(weight))

    def _aggregate_on_device(self, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return apply_updates(self._global, updates, self.policy)
        moved = [
            ClientUpdate(
                deltas={k: d.to(self.device) for k, d in u.deltas.items()},
                visible={k: v.to(self.device) for k, v in u.visible.items()},
                weight=u.weight,
            )
            for u in updates
        ]
        state = {k: v.to(self.device) for k, v in self._global.items()}
        return {k: v.cpu() for k, v in apply_updates(state, moved, self.policy).items()}

    def _aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[tuple[Message, ClientUpdate]] = []
        for message in replies:
            try:
                accepted.append((message, self._client_update(message)))
            except Exception as err:  # one bad reply is skipped, never the round
                self._reject(server_round, message, reason(err))
        accepted = self._without_outliers(server_round, accepted)
        updates = [update for _, update in accepted]
        losses: list[tuple[float, float]] = []
        for message, update in accepted:
            loss = train_loss(message)
            if loss is not None:
                losses.append((loss, update.weight))
        self._log_round(server_round, num_aggregated=float(len(updates)))
        self._sent = {}
        if not updates:
            log(WARNING, "Round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        state = self._aggregate_on_device(updates)
        if self.hidden_feedback:
            state = self._with_feedback(state, accepted)
        total = sum(w for _, w in losses)
        metrics = MetricRecord(
            {"train-loss": sum(loss * w for loss, w in losses) / total} if total else {}
        )
        return ArrayRecord(state), metrics
