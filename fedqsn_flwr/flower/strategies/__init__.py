"""The strategies, one per module: Flower's FedAvg with this project's bookkeeping, and FedQSN."""

from fedqsn_flwr.flower.strategies.fedavg import MeasuredFedAvg
from fedqsn_flwr.flower.strategies.fedqsn import FedQSN
from fedqsn_flwr.flower.strategies.utils import (
    MessageEntry,
    MessageSink,
    MetricsAggrFn,
    NodeConfigFn,
    StateEvaluateFn,
    message_bytes,
)

__all__ = [
    "FedQSN",
    "MeasuredFedAvg",
    "MessageEntry",
    "MessageSink",
    "MetricsAggrFn",
    "NodeConfigFn",
    "StateEvaluateFn",
    "message_bytes",
]
