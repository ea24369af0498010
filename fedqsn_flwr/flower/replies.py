"""Checks of what clients send back: one path for every strategy and message type.

Every check raises :class:`~fedqsn_flwr.flower.proxy.InvalidUpdate` naming the problem;
the strategies turn that into one log line naming the node and skip the reply.
Nothing in a reply is trusted: arrays must decode to exactly their declared
shape and dtype (no broadcasting, no short or long buffers, numpy's ``stype``
only), metrics must hold the expected keys with finite values in range.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from fedqsn_flwr.flower.protocol import (
    METRICS_RECORD,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    TRAIN_LOSS_KEY,
)
from fedqsn_flwr.flower.proxy import InvalidUpdate, array_values

#: Metrics with a meaning fixed by this project's clients, and their ranges.
KNOWN_RANGES = {"accuracy": (0.0, 1.0), "loss": (0.0, math.inf), TRAIN_LOSS_KEY: (0.0, math.inf)}
#: Partition ids and counts a node may claim.
MAX_PARTITIONS = 1_000_000


def checked_array(array: Array, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The values of ``array``, which must be exactly ``shape`` and ``dtype``."""
    if array.stype != "numpy.ndarray":
        raise InvalidUpdate(f"'{name}' has stype {array.stype!r}, expected 'numpy.ndarray'")
    if array.dtype != dtype:
        raise InvalidUpdate(f"'{name}' has dtype {array.dtype}, expected {dtype}")
    if tuple(array.shape) != tuple(shape):
        raise InvalidUpdate(f"'{name}' has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array_values(array)


def metric_record(message: Message) -> MetricRecord:
    """The reply's ``metrics`` record."""
    records = message.content.metric_records
    if METRICS_RECORD not in records:
        raise InvalidUpdate(f"reply has no '{METRICS_RECORD}' MetricRecord")
    return records[METRICS_RECORD]


def number(
    metrics: Mapping[str, object],
    key: str,
    low: float,
    high: float,
    integer: bool = False,
    open_low: bool = False,
) -> float:
    """``metrics[key]`` as a float, finite and in range (an integer if asked)."""
    if key not in metrics:
        raise InvalidUpdate(f"metrics have no '{key}'")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidUpdate(f"'{key}' must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidUpdate(f"'{key}' = {value} is not finite")
    if integer and not value.is_integer():
        raise InvalidUpdate(f"'{key}' = {value} is not an integer")
    too_low = value <= low if open_low else value < low
    if too_low or value > high:
        bracket = "(" if open_low else "["
        raise InvalidUpdate(f"'{key}' = {value:g} is outside {bracket}{low:g}, {high:g}]")
    return value


def train_weight(message: Message, key: str, max_examples: float) -> float:
    """The reply's number of training examples: > 0, finite, at most ``max_examples``."""
    metrics = metric_record(message)
    if key in metrics:
        value = metrics[key]
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(float(value)) and float(value) > max_examples:
                raise InvalidUpdate(f"'{key}' = {value} exceeds the bound {max_examples:g}")
    return number(metrics, key, 0.0, max_examples, open_low=True)


def checked_metrics(
    message: Message, *, weight_key: str, max_examples: float, train: bool
) -> MetricRecord:
    """The reply's metrics, every value a finite number or a list of finite numbers.

    ``weight_key`` (the strategy's ``weighted_by_key``) must be in range: a train
    reply's > 0 and at most ``max_examples``; an evaluate reply's a whole number
    in ``[0, max_examples]`` (0: valid, carries no weight). Anything else a client
    adds is aggregated by the strategy's ``*_metrics_aggr_fn`` (Flower's
    weighted mean by default), so it must be a number too; the metrics this
    project's clients send must be in :data:`KNOWN_RANGES`.
    """
    metrics = metric_record(message)
    if train:
        train_weight(message, weight_key, max_examples)
    else:
        number(metrics, weight_key, 0.0, max_examples, integer=True)
    for key, (low, high) in KNOWN_RANGES.items():
        if key in metrics:
            number(metrics, key, low, high)
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise InvalidUpdate(f"metric '{key}' must be a number, got {type(item).__name__}")
            if not math.isfinite(float(item)):
                raise InvalidUpdate(f"metric '{key}' = {item} is not finite")
    return metrics


def partition_claim(message: Message) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` a node reported, checked."""
    metrics = metric_record(message)
    partitions = number(metrics, NUM_PARTITIONS_KEY, 1.0, MAX_PARTITIONS, integer=True)
    partition = number(metrics, PARTITION_ID_KEY, 0.0, partitions - 1, integer=True)
    return int(partition), int(partitions)


def reason(err: Exception) -> str:
    """One line for the log: what was wrong with a reply."""
    text = str(err).splitlines()[0] if str(err) else ""
    return text if isinstance(err, InvalidUpdate) else f"{type(err).__name__}: {text}"


def reject(server_round: int, message: Message, why: str) -> None:
    """Log that a reply is skipped: the round, its node and why."""
    log(
        WARNING,
        "Round %d: rejected reply from node %d: %s",
        server_round,
        message.metadata.src_node_id,
        why,
    )


def checked_arrays(
    arrays: ArrayRecord, shapes: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, np.ndarray]:
    """The values of ``arrays``: exactly the names of ``shapes``, each its shape and dtype.

    Float arrays must be finite.
    """
    if missing := sorted(set(shapes) - set(arrays.keys())):
        raise InvalidUpdate(f"missing arrays {missing}")
    if extra := sorted(set(arrays.keys()) - set(shapes)):
        raise InvalidUpdate(f"unexpected arrays {extra}")
    checked: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in shapes.items():
        values = checked_array(arrays[name], name, shape, dtype)
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise InvalidUpdate(f"'{name}' holds NaN or Inf")
        checked[name] = values
    return checked


def norm_bounded(
    server_round: int, items: list[tuple[Message, float, float]], ratio: float
) -> list[bool]:
    """Which of ``(reply, update norm, reference norm)`` pass the update-norm bounds.

    An update whose norm exceeds ``ratio`` times its reference (the norm of the
    model its client was sent) fails; with at least 3 left, so does one beyond
    ``ratio`` times their median. Every failure is logged (:func:`reject`).
    """
    keep = [True] * len(items)
    if math.isinf(ratio):
        return keep
    for i, (message, norm, limit) in enumerate(items):
        if not norm <= ratio * limit:
            keep[i] = False
            reject(
                server_round,
                message,
                f"update norm {norm:.4g} is more than {ratio:g} times the norm "
                f"{limit:.4g} of the model the client was sent",
            )
    left = [norm for (_, norm, _), k in zip(items, keep, strict=True) if k]
    if len(left) < 3:
        return keep
    median = statistics.median(left)
    for i, (message, norm, _) in enumerate(items):
        if keep[i] and norm > ratio * median:
            keep[i] = False
            reject(
                server_round,
                message,
                f"update norm {norm:.4g} is more than {ratio:g} times the round's "
                f"median {median:.4g}",
            )
    return keep


def without_failures(server_round: int, replies: list[Message]) -> list[Message]:
    """The replies that carry no error; each failed node is logged."""
    for message in replies:
        if message.has_error():
            log(
                WARNING,
                "Round %d: node %d failed and is skipped: %s",
                server_round,
                message.metadata.src_node_id,
                message.error.reason,
            )
    return [m for m in replies if not m.has_error()]


def checked_model(
    message: Message,
    key: str,
    shapes: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    metrics: MetricRecord,
) -> RecordDict:
    """A FedAvg reply: its arrays (record ``key``, exactly ``shapes``) and checked ``metrics``."""
    if key not in message.content.array_records:
        raise InvalidUpdate(f"reply has no '{key}' ArrayRecord")
    values = checked_arrays(message.content.array_records[key], shapes)
    arrays = ArrayRecord({k: Array(v) for k, v in values.items()})
    return RecordDict({key: arrays, METRICS_RECORD: metrics})
