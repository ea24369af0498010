"""Helpers the strategies share: sizes, norms, the message log, metric checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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
from flwr.common.serde import (
    config_record_to_proto,
    error_to_proto,
    message_to_proto,
    metadata_to_proto,
    metric_record_to_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import Array as ProtoArray
from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp.strategy import Result

from fedqsn_flwr.flower.protocol import METRICS_RECORD

#: Called with a model state the clients receive; returns its accuracy, or named
#: metrics (e.g. ``{"accuracy": ..., "loss": ...}``), logged as ``proxy_<name>``.
StateEvaluateFn = Callable[[Mapping[str, torch.Tensor]], float | Mapping[str, float]]
#: Called with (server round, partition id, message) for every message to a client.
MessageSink = Callable[[int, int, Message], None]
#: Called with (partition id, number of partitions); returns config items for that
#: client's train and evaluate messages alone (e.g. which rows it holds).
NodeConfigFn = Callable[[int, int], Mapping[str, Any]]
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


#: Below this many bytes of array data a message is simply serialized to be measured.
_SERIALIZE_BELOW = 1 << 16
#: Bytes of the tag of ``Array.data`` (field 4, length-delimited).
_DATA_TAG_BYTES = 1
# message_bytes mirrors Flower's Array layout: fail loudly, not count wrong, if it changes
if {f.name: f.number for f in ProtoArray.DESCRIPTOR.fields} != {
    "dtype": 1,
    "shape": 2,
    "stype": 3,
    "data": 4,
}:  # pragma: no cover - a Flower upgrade
    raise ImportError("Flower's Array proto changed: update message_bytes in this module")


def message_bytes(message: Message) -> int:
    """Size of ``message`` serialized as Flower's protobuf ``Message``.

    Exact, without copying the arrays' bytes when they are large: serializing
    builds nested protobuf messages, each of which copies every byte of its
    children (about five copies of a ~100 M model's update, several seconds).
    Instead the message is built *hollow* (arrays without their data) and every
    enclosing size grown by the data's length and the longer length prefixes.
    """
    if not message.has_content():
        return message_to_proto(message).ByteSize()
    content = message.content
    records = content.array_records.values()
    if sum(len(a.data) for r in records for a in r.values()) < _SERIALIZE_BELOW:
        return message_to_proto(message).ByteSize()
    hollow = ProtoMessage(
        metadata=metadata_to_proto(message.metadata),
        content=_hollow_recorddict(content),
        error=error_to_proto(message.error) if message.has_error() else None,
    )
    dict_before = hollow.content.ByteSize()
    dict_after = dict_before
    for item, record in zip(hollow.content.items, content.values(), strict=True):
        if not isinstance(record, ArrayRecord):
            continue
        record_before = item.array_record.ByteSize()
        record_after = record_before
        for entry, array in zip(item.array_record.items, record.values(), strict=True):
            if not (length := len(array.data)):
                continue  # an empty bytes field is not serialized, hollow or not
            value_before = entry.value.ByteSize()
            value_after = value_before + _DATA_TAG_BYTES + _varint_bytes(length) + length
            entry_before = entry.ByteSize()
            entry_after = entry_before + _grown(value_before, value_after)
            record_after += _grown(entry_before, entry_after)
        item_before = item.ByteSize()
        dict_after += _grown(item_before, item_before + _grown(record_before, record_after))
    return hollow.ByteSize() + _grown(dict_before, dict_after)


def _hollow_recorddict(content: RecordDict) -> ProtoRecordDict:
    """Flower's ``recorddict_to_proto`` of ``content``, arrays without their data."""
    items = []
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = ProtoArrayRecord(
                items=[
                    ProtoArrayRecord.Item(
                        key=k, value=ProtoArray(dtype=a.dtype, shape=a.shape, stype=a.stype)
                    )
                    for k, a in record.items()
                ]
            )
            items.append(ProtoRecordDict.Item(key=key, array_record=arrays))
        elif isinstance(record, MetricRecord):
            items.append(
                ProtoRecordDict.Item(key=key, metric_record=metric_record_to_proto(record))
            )
        elif isinstance(record, ConfigRecord):
            items.append(
                ProtoRecordDict.Item(key=key, config_record=config_record_to_proto(record))
            )
        else:
            raise ValueError(f"Unsupported record type: {type(record)}")
    return ProtoRecordDict(items=items)


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _grown(before: int, after: int) -> int:
    """Growth of a length-delimited field whose payload grows from ``before`` to ``after``."""
    return after - before + _varint_bytes(after) - _varint_bytes(before)


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


#: The log line of a round whose aggregate is not finite.
NOT_FINITE = "Round %d: the aggregate is not finite; the global model is unchanged"


def in_dtypes(arrays: ArrayRecord, dtypes: Mapping[str, np.dtype]) -> ArrayRecord | None:
    """Flower's aggregate in the global model's ``dtypes``; None if not finite.

    Flower averages integer arrays (e.g. BatchNorm's batch counter) into
    float64: they are rounded back, or every later reply would be refused for
    its dtype.
    """
    out: dict[str, Array] = {}
    for name, array in arrays.items():
        values, dtype = array.numpy(), dtypes[name]
        if dtype.kind in "fc" and not np.isfinite(values).all():
            return None
        if dtype.kind in "iub":
            values = np.rint(values)
        out[name] = Array(np.array(values, dtype=dtype, order="C"))
    return ArrayRecord(out)


def with_config(message: Message, key: str, extra: Mapping[str, Any]) -> Message:
    """``message`` with ``extra`` in its own copy of config record ``key``."""
    if not extra:
        return message
    content = RecordDict(dict(message.content.items()))
    # records may be shared by every message of a round: a new one per message
    content[key] = ConfigRecord({**dict(content.config_records[key]), **extra})
    return Message(
        content=content,
        message_type=message.metadata.message_type,
        dst_node_id=message.metadata.dst_node_id,
    )
