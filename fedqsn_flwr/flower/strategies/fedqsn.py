"""FedQSN: every client trains a private, masked and quantized proxy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore import log

from fedqsn_flwr.core.aggregation import ClientUpdate, apply_updates
from fedqsn_flwr.core.feedback import (
    GradientFn,
    LossFn,
    server_hidden,
)
from fedqsn_flwr.core.masking import (
    MaskPolicy,
    UnitMask,
    apply_mask,
    draw_client_mask,
    draw_server_mask,
)
from fedqsn_flwr.core.secret import new_secret, secret_digest, secret_rng
from fedqsn_flwr.flower.privacy import ExposureTracker
from fedqsn_flwr.flower.protocol import (
    LAYOUT_RECORD,
    METRICS_RECORD,
    PROXY_RECORD,
    UPDATE_RECORD,
)
from fedqsn_flwr.flower.proxy import (
    UPDATE_BIT_WIDTHS,
    InvalidUpdate,
    ProxySpec,
    checked_update,
    encode_proxy,
    proxy_layout,
    proxy_norm,
)
from fedqsn_flwr.flower.replies import reason, reject
from fedqsn_flwr.flower.strategies.fedavg import MeasuredFedAvg
from fedqsn_flwr.flower.strategies.feedback import HiddenFeedback
from fedqsn_flwr.flower.strategies.monitor import PrivacyMonitor
from fedqsn_flwr.flower.strategies.utils import EVALUATE, NOT_FINITE, TRAIN

#: How masks are drawn from the secret (numpy PCG64 filled by the whole secret);
#: a checkpoint of another scheme cannot resume under this one.
SECRET_DRAWS = 2


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

    Every option after ``policy`` is keyword-only.

    Parameters
    ----------
    policy : MaskPolicy
        Which tensors are masked (and along which axis) and quantized
        (:func:`fedqsn_flwr.core.masking.policy_for_model`).
    server_mask_ratio : float (default: 0.1)
        p1, share of units hidden from every client for the whole run.
    client_mask_ratio : float (default: 0.1)
        p2, share of server-visible units hidden per client per round.
    bit_width : int | None (default: 4)
        Bits per quantized value (2..8); None sends float32 proxies.
    block_size : int (default: 64)
        Values per absmax quantization block.
    update_bit_width : int (default: 16)
        How clients encode their updates: 32 (float32), 16 (float16: half the
        bytes, no accuracy cost measured) or 2..8 (NF-k codes in blocks of
        ``block_size``); see :mod:`fedqsn_flwr.flower.proxy`.
    device : str | torch.device (default: "cpu")
        Where proxies are built and updates aggregated (e.g. ``"cuda"``). The
        global model handed back to Flower is always on the CPU.
    privacy_metrics : bool (default: False)
        Measure proxies as their clients will decode them and log their
        similarity to the global model and the exposure (``round_log``); this
        project's ServerApp switches it on.
    privacy_proxies : int (default: 1)
        With ``privacy_metrics``, how many proxies per round are compared with
        the global model (the first ones built; 0: every proxy). Each costs
        about one decode on the server; the proxies of a round differ only by
        their client masks. Exposure always counts every message.
    server_secret : bytes, optional
        32 bytes no client can obtain (:mod:`fedqsn_flwr.core.secret`): the server
        mask and every client mask derive from it. Default: fresh random bytes,
        so masks differ from run to run; pass one to reproduce a run.
    hidden_feedback : bool (default: False)
        Step the server-hidden units with the clients' gradients at the hidden
        positions and a control variate from the server's own data
        (:mod:`fedqsn_flwr.core.feedback`); needs ``feedback_gradient_fn``,
        ``feedback_loss_fn`` and a train config with ``learning-rate``,
        ``local-epochs`` and ``batch-size``.
    feedback_gradient_fn : GradientFn, optional
        Mean loss gradient of a model state on the server's own data.
    feedback_loss_fn : LossFn, optional
        Mean loss of a model state on *other*, held-out data of the server's: a
        feedback step is kept only if it raises it by at most
        ``feedback_tolerance`` (halved up to
        :data:`~fedqsn_flwr.core.feedback.HALVINGS` times, else dropped; the
        kept fraction is ``round_log[r]["feedback_kept"]``).
    feedback_tolerance : float (default: 0.02)
        Relative rise of that held-out loss a feedback step may cause.
    feedback_step : float (default: 1.0)
        Step on hidden units in units of learning rate x local steps.
    feedback_clip : float (default: 5.0)
        A client's hidden gradient is clipped to this many times the norm of the
        server's gradient of the same proxy on its own data.
    proxy_evaluations : int (default: 0)
        Proxies per round that ``proxy_evaluate_fn`` scores: the first ones
        built (0: every proxy). Scoring a language model's proxy on a test set
        can cost more than its client's training; the proxies of a round differ
        only by their client masks.
    **options
        :class:`~fedqsn_flwr.flower.strategies.fedavg.MeasuredFedAvg`'s options:
        FedAvg's (``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``,
        ``min_evaluate_nodes``, ``min_available_nodes``, ``weighted_by_key``,
        ``configrecord_key``, ``train_metrics_aggr_fn``,
        ``evaluate_metrics_aggr_fn``; all honoured) and ``seed`` (of node
        sampling: public, clients may know it), ``proxy_evaluate_fn`` (called on
        every proxy decoded from its message), ``message_sink``,
        ``node_config_fn``, ``partition_query``, ``max_num_examples``,
        ``max_update_norm_ratio`` (an update, in global units, against the norm
        of the proxy its client was sent: never the global model's, whose hidden
        part acceptance would then reveal).
        ``arrayrecord_key`` is refused: FedQSN sends proxies (``"proxy"``,
        ``"proxy-layout"``) and takes back updates (``"update"``), never plain
        arrays (:mod:`fedqsn_flwr.flower.protocol`). An unknown name raises
        :class:`TypeError`.

    """

    def __init__(
        self,
        policy: MaskPolicy,
        *,
        server_mask_ratio: float = 0.1,
        client_mask_ratio: float = 0.1,
        bit_width: int | None = 4,
        block_size: int = 64,
        update_bit_width: int = 16,
        device: str | torch.device = "cpu",
        privacy_metrics: bool = False,
        privacy_proxies: int = 1,
        server_secret: bytes | None = None,
        hidden_feedback: bool = False,
        feedback_gradient_fn: GradientFn | None = None,
        feedback_loss_fn: LossFn | None = None,
        feedback_tolerance: float = 0.02,
        feedback_step: float = 1.0,
        feedback_clip: float = 5.0,
        proxy_evaluations: int = 0,
        **options: Any,
    ) -> None:
        if options.get("arrayrecord_key", "arrays") != "arrays":
            raise ValueError(
                "FedQSN sends proxies and takes back updates under fixed record names "
                "(fedqsn_flwr.flower.protocol), never plain arrays: arrayrecord_key "
                f"{options['arrayrecord_key']!r} cannot be honoured"
            )
        if not isinstance(policy, MaskPolicy):
            raise TypeError(
                f"policy must be a MaskPolicy (see policy_for_model), got {type(policy).__name__}"
            )
        super().__init__(**options)
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
        if proxy_evaluations < 0:
            raise ValueError(f"proxy_evaluations must be >= 0, got {proxy_evaluations}")
        if privacy_proxies < 0:
            raise ValueError(f"privacy_proxies must be >= 0, got {privacy_proxies}")
        self.proxy_evaluations = proxy_evaluations
        self.update_bit_width = update_bit_width
        self.device = torch.device(device)
        self.privacy_metrics = privacy_metrics
        self.policy = policy
        self.server_mask_ratio = server_mask_ratio
        self.client_mask_ratio = client_mask_ratio
        self.bit_width = bit_width
        self.block_size = block_size
        if hidden_feedback and (feedback_gradient_fn is None or feedback_loss_fn is None):
            raise ValueError(
                "hidden_feedback needs data of the server's own: pass feedback_gradient_fn "
                "(the mean loss gradient of a state on that data) and feedback_loss_fn (the "
                "mean loss of a state on held-out data of the server's, which guards each step)"
            )
        if hidden_feedback and (not policy.unit_axes or server_mask_ratio == 0.0):
            raise ValueError("hidden_feedback needs a server mask (masked tensors and p1 > 0)")
        self.server_secret = server_secret if server_secret is not None else new_secret()
        self.server_mask: UnitMask = draw_server_mask(
            policy, server_mask_ratio, secret_rng(self.server_secret, "server-mask")
        )
        if not feedback_tolerance >= 0:
            raise ValueError(f"feedback_tolerance must be >= 0, got {feedback_tolerance}")
        self.hidden_feedback = hidden_feedback
        self._server_hidden = server_hidden(policy, self.server_mask)
        self.feedback: HiddenFeedback | None = None
        if hidden_feedback:
            assert feedback_gradient_fn is not None and feedback_loss_fn is not None
            self.feedback = HiddenFeedback(
                policy,
                self._server_hidden,
                gradient_fn=feedback_gradient_fn,
                loss_fn=feedback_loss_fn,
                tolerance=feedback_tolerance,
                step=feedback_step,
                clip=feedback_clip,
            )
        self._global: dict[str, torch.Tensor] = {}
        self._sent: dict[int, ProxySpec] = {}
        self._sent_norms: dict[int, float] = {}
        self.monitor = PrivacyMonitor(
            policy,
            similarity=privacy_metrics,
            evaluations=proxy_evaluations,
            similarities=privacy_proxies,
        )

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

    def client_mask(self, server_round: int, partition_id: int, purpose: int = TRAIN) -> UnitMask:
        """The client mask of one client (by partition id) in one round."""
        rng = secret_rng(self.server_secret, "client-mask", server_round, purpose, partition_id)
        return draw_client_mask(self.server_mask, self.client_mask_ratio, rng, self.policy.groups)

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
        shared: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[Message, ProxySpec]:
        visible = self.client_mask(server_round, self.partition_ids[node_id], purpose)
        proxy, layout, spec = encode_proxy(
            state,
            self.policy,
            visible,
            bit_width=self.bit_width,
            block_size=self.block_size,
            update_bit_width=self.update_bit_width,
            layout=layout,
            shared=shared,
        )
        content = RecordDict(
            {PROXY_RECORD: proxy, LAYOUT_RECORD: layout, self.configrecord_key: config}
        )
        return Message(content=content, message_type=message_type, dst_node_id=node_id), spec

    def _layout(self, state: Mapping[str, torch.Tensor]) -> ConfigRecord:
        # The same for every client of a round; Flower's records may be shared.
        return proxy_layout(
            state,
            self.policy,
            bit_width=self.bit_width,
            block_size=self.block_size,
            update_bit_width=self.update_bit_width,
        )

    def _on_device(
        self, arrays: ArrayRecord, state: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        state = state if state is not None else arrays.to_torch_state_dict()
        return {k: v.to(self.device) for k, v in state.items()}

    def _train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """One proxy per node; then :attr:`monitor` measures what the messages carry."""
        self._global = arrays.to_torch_state_dict()
        if self.feedback is not None:
            self.feedback.prepare(config, self._global)
        state = self._on_device(arrays, self._global)
        layout = self._layout(state)
        messages: list[Message] = []
        self._sent, self._sent_norms = {}, {}
        unmasked_squares: dict[str, float] = {}
        shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # unmasked codes, once
        for node_id in node_ids:
            message, self._sent[node_id] = self._proxy_message(
                state, server_round, node_id, config, MessageType.TRAIN, TRAIN, layout, shared
            )
            messages.append(message)
            # the update bound's reference: the proxy's norm, which the client holds,
            # not the global model's, which would make acceptance an oracle on it
            self._sent_norms[node_id] = proxy_norm(
                message.content[PROXY_RECORD], message.content[LAYOUT_RECORD], unmasked_squares
            )
            if self.feedback is not None:
                self.feedback.sent(node_id, message)
        found = self.monitor.train_round(self._global, messages, self.proxy_evaluate_fn)
        self.records.add(server_round, **found)
        return messages

    def checkpoint_state(self) -> dict[str, Any]:
        """Adds a digest of the server secret and, with privacy metrics, the exposure.

        The digest lets :meth:`restore` refuse another secret: resuming under a
        new server mask would show clients units the run has hidden so far.
        """
        state = super().checkpoint_state()
        state["secret_digest"] = secret_digest(self.server_secret)
        state["secret_draws"] = SECRET_DRAWS
        if self.monitor.exposure is not None:
            state["exposure_seen"] = {n: m.clone() for n, m in self.monitor.exposure.seen.items()}
        return state

    def restore(
        self, state: Mapping[str, Any], global_state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Take back a checkpoint; ``global_state`` shapes the exposure tracker.

        Raises
        ------
        ValueError
            The checkpoint was taken under another server secret.

        """
        if state.get("secret_digest", secret_digest(self.server_secret)) != secret_digest(
            self.server_secret
        ):
            raise ValueError(
                "the checkpoint was taken under another server secret: resuming with a new "
                "server mask would show clients units hidden so far; pass the run's server_secret"
            )
        if state.get("secret_draws") != SECRET_DRAWS:
            raise ValueError(
                "the checkpoint was written by a fedqsn-flwr that drew its masks from the secret "
                "another way: resuming would draw another server mask and show clients units "
                "hidden so far; finish the run with the version that started it"
            )
        super().restore(state)
        if "exposure_seen" in state and global_state is not None:
            self.monitor.exposure = ExposureTracker(global_state, self.policy)
            self.monitor.exposure.seen = {n: m.clone() for n, m in state["exposure_seen"].items()}

    @property
    def exposure_bound(self) -> float:
        """The most exposure the server mask allows (see :mod:`fedqsn_flwr.flower.privacy`)."""
        if self.monitor.exposure is None:
            raise RuntimeError("exposure is tracked with privacy_metrics=True, once proxies go out")
        return self.monitor.exposure.bound(self.server_mask_ratio)

    def _evaluate_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """One proxy per node, under evaluation client masks; their units count as exposed."""
        state = self._on_device(arrays)
        layout = self._layout(state)
        shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        messages = [
            self._proxy_message(
                state, server_round, n, config, MessageType.EVALUATE, EVALUATE, layout, shared
            )[0]
            for n in node_ids
        ]
        self.records.add(server_round, **self.monitor.evaluate_round(messages))
        return messages

    def _norm_limit(self, message: Message) -> float:
        found = self._sent_norms.get(message.metadata.src_node_id, math.inf)
        return found if math.isfinite(found) else math.inf

    def _without_outliers(
        self, server_round: int, accepted: list[tuple[Message, ClientUpdate, float]]
    ) -> list[tuple[Message, ClientUpdate]]:
        """Drop updates beyond the norm bounds (:meth:`MeasuredFedAvg._norm_bounded`).

        ``accepted`` holds every valid reply, its update and the update's norm.
        """
        keep = self._norm_bounded(server_round, [(m, norm) for m, _, norm in accepted])
        return [(m, u) for (m, u, _), k in zip(accepted, keep, strict=True) if k]

    def _client_update(self, message: Message) -> tuple[ClientUpdate, float]:
        """Validate one reply; its :class:`ClientUpdate` and the update's norm in global units.

        The update keeps the reply's values as they came (no copy, the unit
        scaling left to aggregation: :attr:`ClientUpdate.divisors`).
        """
        node_id = message.metadata.src_node_id
        spec = self._sent.get(node_id)
        if spec is None:
            raise InvalidUpdate("no proxy was sent to this node in this round")
        content = message.content
        if UPDATE_RECORD not in content.array_records:
            raise InvalidUpdate(f"reply has no '{UPDATE_RECORD}' ArrayRecord")
        metrics = self._checked_metrics(message, train=True)
        weight = float(metrics[self.weighted_by_key])  # type: ignore[arg-type]
        update, norm = checked_update(content.array_records[UPDATE_RECORD], spec, self.policy)
        if self.feedback is not None:
            self.feedback.received(node_id, content, spec)
        return replace(update, weight=weight), norm

    def _aggregate_on_device(self, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return apply_updates(self._global, updates, self.policy)
        moved = [
            ClientUpdate(
                deltas={k: u.in_global_units(k).to(self.device) for k in u.deltas},
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
        checked: list[tuple[Message, ClientUpdate, float]] = []
        for message in replies:
            try:
                checked.append((message, *self._client_update(message)))
            except Exception as err:  # one bad reply is skipped, never the round
                reject(server_round, message, reason(err))
        accepted = self._without_outliers(server_round, checked)
        updates = [update for _, update in accepted]
        self.records.add(server_round, num_aggregated=float(len(updates)))
        self._sent = {}
        if not updates:
            log(WARNING, "Round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        state = self._aggregate_on_device(updates)
        if self.feedback is not None:
            claims = [(m.metadata.src_node_id, u.weight) for m, u in accepted]
            state, kept = self.feedback.apply(server_round, state, claims)
            if kept is not None:
                self.records.add(server_round, feedback_kept=kept)
        if not all(bool(t.isfinite().all()) for t in state.values() if t.is_floating_point()):
            log(WARNING, NOT_FINITE, server_round)
            return None, None
        # the metrics were checked with the update (_client_update)
        metrics = [m.content.metric_records[METRICS_RECORD] for m, _ in accepted]
        return ArrayRecord(state), self._train_metrics(metrics)
