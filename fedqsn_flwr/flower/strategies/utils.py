"""Helpers the strategies share: sizes, norms, the message log, metric checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto
from flwr.serverapp.strategy import Result

from fedqsn_flwr.flower.protocol import METRICS_RECORD

#: Called with a model state the clients receive; returns its accuracy, or named
#: metrics (e.g. ``{"accuracy": ..., "loss": ...}``), logged as ``proxy_<name>``.
StateEvaluateFn = Callable[[Mapping[str, torch.Tensor]], float | Mapping[str, float]]
#: Called with (server round, partition id, message) for every message to a client.
MessageSink = Callable[[int, int, Message], None]
#: Flower's metric aggregation: (replies' records, weighting key) -> aggregate.
MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]

#: What a message is for (keys of the client-mask seed: a client's training and
#: evaluation proxies of one round hide different units).
TRAIN, EVALUATE = 1, 2
PURPOSES = {TRAIN: MessageType.TRAIN, EVALUATE: MessageType.EVALUATE}


def proxy_metrics(results: list[float | Mapping[str, float]]) -> dict[str, float]:
    """Mean of :data:`StateEvaluateFn` results over clients, as ``proxy_<name>`` values."""
    named = [r if isinstance(r, Mapping) else {"accuracy": float(r)} for r in results]
    keys = set.intersection(*(set(r) for r in named)) if named else set()
    return {f"proxy_{k}": sum(float(r[k]) for r in named) / len(named) for k in sorted(keys)}


def l2_norm(arrays: Iterable[np.ndarray]) -> float:
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


def common_metrics(metrics: list[MetricRecord]) -> list[MetricRecord]:
    """``metrics`` restricted to the keys every one holds, with equal list lengths.

    Flower's weighted mean would silently mix replies holding other keys and
    fail on lists of other lengths; a client adding or dropping a metric only
    takes that metric out of the round's aggregate, never another reply.
    """
    if not metrics:
        return []
    shapes = [{k: len(v) if isinstance(v, list) else None for k, v in m.items()} for m in metrics]
    keys = set.intersection(*(set(shape) for shape in shapes))
    keys = {k for k in keys if len({shape[k] for shape in shapes}) == 1}
    return [MetricRecord({k: v for k, v in m.items() if k in keys}) for m in metrics]


def aggregate_metrics(
    aggr_fn: MetricsAggrFn, metrics: list[MetricRecord], weight_key: str
) -> MetricRecord | None:
    """``aggr_fn`` over the replies that carry weight, on their common keys.

    None when no reply carries weight.
    """
    weighted = [m for m in metrics if float(m[weight_key]) > 0]  # type: ignore[arg-type]
    if not weighted:
        return None
    records = [RecordDict({METRICS_RECORD: m}) for m in common_metrics(weighted)]
    return aggr_fn(records, weight_key)


def shifted_result(result: Result, offset: int) -> Result:
    """``result`` with every round number moved by ``offset`` (a resumed run)."""

    def shift(by_round: dict[int, MetricRecord]) -> dict[int, MetricRecord]:
        return {r + offset: m for r, m in by_round.items()}

    return Result(
        arrays=result.arrays,
        train_metrics_clientapp=shift(result.train_metrics_clientapp),
        evaluate_metrics_clientapp=shift(result.evaluate_metrics_clientapp),
        evaluate_metrics_serverapp=shift(result.evaluate_metrics_serverapp),
    )
