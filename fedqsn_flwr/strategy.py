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

import torch
from flwr.app import (
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
from flwr.supercore import log

from .aggregation import ClientUpdate, apply_updates
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
    LAYOUT_RECORD,
    PROXY_RECORD,
    UPDATE_BIT_WIDTHS,
    UPDATE_RECORD,
    InvalidUpdate,
    PackedTensor,
    ProxySpec,
    decode_proxy,
    decode_update,
    encode_proxy,
    iter_packed,
    proxy_layout,
)

#: Called with a model state the clients receive; returns its accuracy.
StateEvaluateFn = Callable[[Mapping[str, torch.Tensor]], float]
#: Called with (server round, partition id, message) for every message to a client.
MessageSink = Callable[[int, int, Message], None]

PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
METRICS_RECORD = "metrics"
_TRAIN, _EVALUATE = 1, 2


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
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.seed = seed
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
    ) -> Result:
        """Flower's round loop; ``first_round`` > 1 continues after a checkpoint.

        ``initial_arrays`` are then the global model after round ``first_round - 1``.
        """
        if first_round <= 1:
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
        for reply in grid.send_and_receive(queries, timeout=60):
            node_id = reply.metadata.src_node_id
            partition = None
            if not reply.has_error():
                for record in reply.content.metric_records.values():
                    partition = record.get(PARTITION_ID_KEY)
                    self.num_partitions = max(
                        self.num_partitions, int(record.get(NUM_PARTITIONS_KEY, 0))
                    )
            self.partition_ids[node_id] = int(partition) if partition is not None else node_id
        for node_id in unknown:
            self.partition_ids.setdefault(node_id, node_id)

    def _sample(
        self, grid: Grid, server_round: int, fraction: float, min_nodes: int, purpose: int
    ) -> list[int]:
        wanted = max(self.min_available_nodes, min_nodes)
        while len(all_nodes := sorted(grid.get_node_ids())) < wanted:
            log(INFO, "Waiting for nodes: %d connected (need %d)", len(all_nodes), wanted)
            time.sleep(1)
        self._learn_partition_ids(grid, all_nodes)
        ordered = sorted(all_nodes, key=lambda n: (self.partition_ids[n], n))
        size = min(len(ordered), max(int(len(ordered) * fraction), min_nodes))
        rng = random.Random(derive_seed(self.seed, server_round, purpose))
        chosen = sorted(rng.sample(ordered, size), key=ordered.index)
        log(INFO, "Round %d: sampled %d of %d nodes", server_round, size, len(ordered))
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

    def _aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies in partition order; record their sizes and failures."""
        started = time.perf_counter()
        replies = self._ordered(replies)
        self._record(server_round, replies, "up")
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
        """Aggregate client-side evaluation metrics in partition order."""
        replies = self._ordered(replies)
        self._record(server_round, replies, "up")
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and "accuracy" in metrics:
            self._log_round(server_round, client_eval_accuracy=float(metrics["accuracy"]))
        return metrics


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
        Seed of the server mask, client masks and sampling.
    proxy_evaluate_fn : StateEvaluateFn, optional
        Called on every proxy decoded from its message (what the client gets).
    message_sink : MessageSink, optional
        Called with every training message sent (see :class:`MeasuredFedAvg`).
    max_num_examples : float (default: inf)
        Replies claiming more training examples than this are rejected.
    max_update_norm_ratio : float (default: inf)
        With at least 3 valid replies, an update whose L2 norm exceeds this many
        times the round's median update norm is rejected.
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
        max_update_norm_ratio: float = math.inf,
        update_bit_width: int = 16,
        device: str | torch.device = "cpu",
        privacy_metrics: bool = True,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(
            seed=seed,
            proxy_evaluate_fn=proxy_evaluate_fn,
            message_sink=message_sink,
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
        self.max_num_examples = max_num_examples
        self.max_update_norm_ratio = max_update_norm_ratio
        self.server_mask_ratio = server_mask_ratio
        self.client_mask_ratio = client_mask_ratio
        self.bit_width = bit_width
        self.block_size = block_size
        self.server_mask: UnitMask = draw_server_mask(policy, server_mask_ratio, seed)
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
        log(INFO, "\t│\t└── masked tensors: %s", ", ".join(sorted(self.policy.unit_axes)))
        super().summary()

    def client_mask(self, server_round: int, partition_id: int, purpose: int = _TRAIN) -> UnitMask:
        """The client mask of one client (by partition id) in one round."""
        seed = derive_seed(self.seed, server_round, purpose, partition_id)
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

    @staticmethod
    def _reject(server_round: int, message: Message, reason: str) -> None:
        log(
            WARNING,
            "Round %d: rejected reply from node %d: %s",
            server_round,
            message.metadata.src_node_id,
            reason,
        )

    def _without_outliers(
        self, server_round: int, accepted: list[tuple[Message, ClientUpdate]]
    ) -> list[tuple[Message, ClientUpdate]]:
        """Drop updates whose norm is far beyond the round's median (needs >= 3)."""
        if len(accepted) < 3 or math.isinf(self.max_update_norm_ratio):
            return accepted
        norms = [
            math.sqrt(sum(float(d.double().pow(2).sum()) for d in u.deltas.values()))
            for _, u in accepted
        ]
        median = statistics.median(norms)
        kept = []
        for (message, update), norm in zip(accepted, norms, strict=True):
            if norm > self.max_update_norm_ratio * median:
                self._reject(
                    server_round,
                    message,
                    f"update norm {norm:.4g} is more than {self.max_update_norm_ratio:g} "
                    f"times the round's median {median:.4g}",
                )
            else:
                kept.append((message, update))
        return kept

    def _client_update(self, message: Message) -> ClientUpdate:
        """Validate one reply and turn it into a :class:`ClientUpdate`."""
        node_id = message.metadata.src_node_id
        spec = self._sent.get(node_id)
        if spec is None:
            raise InvalidUpdate("no proxy was sent to this node in this round")
        content = message.content
        if UPDATE_RECORD not in content.array_records:
            raise InvalidUpdate(f"reply has no '{UPDATE_RECORD}' ArrayRecord")
        if METRICS_RECORD not in content.metric_records:
            raise InvalidUpdate(f"reply has no '{METRICS_RECORD}' MetricRecord")
        weight = content.metric_records[METRICS_RECORD].get(self.weighted_by_key)
        if not isinstance(weight, int | float) or not 0 < weight < math.inf:
            raise InvalidUpdate(
                f"'{self.weighted_by_key}' must be a positive finite number, got {weight!r}"
            )
        if weight > self.max_num_examples:
            raise InvalidUpdate(
                f"'{self.weighted_by_key}' = {weight} exceeds the bound {self.max_num_examples}"
            )
        deltas = decode_update(content.array_records[UPDATE_RECORD], spec, self.policy)
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
            except InvalidUpdate as err:
                self._reject(server_round, message, str(err))
        accepted = self._without_outliers(server_round, accepted)
        updates = [update for _, update in accepted]
        losses: list[tuple[float, float]] = []
        for message, update in accepted:
            loss = message.content[METRICS_RECORD].get("train-loss")
            if isinstance(loss, int | float):
                losses.append((float(loss), update.weight))
        self._log_round(server_round, num_aggregated=float(len(updates)))
        self._sent = {}
        if not updates:
            log(WARNING, "Round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        state = self._aggregate_on_device(updates)
        total = sum(w for _, w in losses)
        metrics = MetricRecord(
            {"train-loss": sum(loss * w for loss, w in losses) / total} if total else {}
        )
        return ArrayRecord(state), metrics
