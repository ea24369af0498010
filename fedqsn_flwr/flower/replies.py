"""Checks of what clients send back: one path for every strategy and message type.

Every check raises :class:`~fedqsn_flwr.flower.proxy.InvalidUpdate` naming the problem;
the strategies turn that into one log line naming the node and skip the reply.
Nothing in a reply is trusted: arrays must decode to exactly their declared
shape and dtype (no broadcasting, no short or long buffers, numpy's ``stype``
only), metrics must hold the expected keys with finite values in range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, Message, MetricRecord

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
    message: Message, weight_key: str, max_examples: float, train: bool
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
