"""Hidden-unit feedback on the server's side: one round's gradients and its guarded step.

The method is :mod:`fedqsn_flwr.core.feedback`; this collaborator of
:class:`~fedqsn_flwr.flower.strategies.fedqsn.FedQSN` holds what one round of it
needs: the global model's gradient on the server's data at the hidden units,
each sent proxy's (``g_p``), the clients' validated feedback, and the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore import log

from fedqsn_flwr.core.feedback import (
    ClientFeedback,
    GradientFn,
    LossFn,
    feedback_direction,
    guarded_feedback,
    hidden_slices,
    local_steps,
    select_units,
)
from fedqsn_flwr.core.masking import MaskPolicy
from fedqsn_flwr.flower.protocol import FEEDBACK_RECORD, LAYOUT_RECORD, PROXY_RECORD
from fedqsn_flwr.flower.proxy import InvalidUpdate, ProxySpec, decode_feedback, decode_proxy
from fedqsn_flwr.flower.proxy import hidden_units as hidden_among


class HiddenFeedback:
    """One round of hidden-unit feedback at a strategy's server-hidden units.

    Parameters
    ----------
    policy : MaskPolicy
        The strategy's mask policy.
    server_hidden : Mapping[str, torch.Tensor]
        Per masked tensor, the indices of its server-hidden units.
    gradient_fn : GradientFn
        Mean loss gradient of a model state on the server's own data.
    loss_fn : LossFn
        Mean loss of a state on held-out data of the server's (the step's guard).
    tolerance : float
        Relative rise of that loss a step may cause.
    step : float
        Step in units of learning rate x local steps.
    clip : float
        A client's hidden gradient is clipped to this many times the norm of its
        proxy's gradient on the server's data.

    """

    def __init__(
        self,
        policy: MaskPolicy,
        server_hidden: Mapping[str, torch.Tensor],
        *,
        gradient_fn: GradientFn,
        loss_fn: LossFn,
        tolerance: float,
        step: float,
        clip: float,
    ) -> None:
        self.policy = policy
        self.server_hidden = dict(server_hidden)
        self.gradient_fn = gradient_fn
        self.loss_fn = loss_fn
        self.tolerance = tolerance
        self.step = step
        self.clip = clip
        self.full_gradient: dict[str, torch.Tensor] = {}
        #: Per node, ``g_p`` of the proxy it was sent this round.
        self.references: dict[int, dict[str, torch.Tensor]] = {}
        #: Per node, its reply's validated feedback this round.
        self.replies: dict[int, ClientFeedback] = {}
        self.learning_rate = 0.0
        self._local_steps: Callable[[list[float]], int] | None = None

    def prepare(self, config: ConfigRecord, global_state: Mapping[str, torch.Tensor]) -> None:
        """The round's full-model gradient and step settings (from the train ``config``)."""
        missing = [k for k in ("learning-rate", "local-epochs", "batch-size") if k not in config]
        if missing:
            raise ValueError(
                f"hidden_feedback needs the train config to hold {missing} "
                "(the step on hidden units is learning rate x local steps)"
            )
        epochs, batch = int(config["local-epochs"]), max(1, int(config["batch-size"]))
        self.learning_rate = float(config["learning-rate"])
        self._local_steps = lambda claims: local_steps(claims, epochs, batch)
        gradient = self.gradient_fn(global_state)
        self.full_gradient = hidden_slices(gradient, self.policy, self.server_hidden)
        self.references, self.replies = {}, {}

    def sent(self, node_id: int, message: Message) -> None:
        """Keep ``g_p``: the gradient of the proxy in ``message`` on the server's data."""
        proxy = decode_proxy(message.content[PROXY_RECORD], message.content[LAYOUT_RECORD])
        gradient = self.gradient_fn(proxy.state)
        self.references[node_id] = hidden_slices(gradient, self.policy, self.server_hidden)

    def received(self, node_id: int, content: RecordDict, spec: ProxySpec) -> None:
        """Validate a reply's feedback and keep its slices at the server-hidden units."""
        if FEEDBACK_RECORD not in content.array_records:
            raise InvalidUpdate(f"reply has no '{FEEDBACK_RECORD}' ArrayRecord")
        hidden = decode_feedback(content.array_records[FEEDBACK_RECORD], spec, self.policy)
        gradient = {}
        for name, units in self.server_hidden.items():
            if not units.numel():
                continue
            among = hidden_among(self.policy.unit_counts[name], spec.visible[name])
            gradient[name] = select_units(hidden[name], self.policy.unit_axes[name], among, units)
        self.replies[node_id] = ClientFeedback(gradient, self.references[node_id])

    def apply(
        self,
        server_round: int,
        state: dict[str, torch.Tensor],
        accepted: list[tuple[int, float]],
    ) -> tuple[dict[str, torch.Tensor], float | None]:
        """``state`` stepped at its server-hidden units; the share of the step kept.

        ``accepted``: ``(node id, claimed examples)`` of the replies aggregated.
        Every reply counts the same and the step follows the low median of the
        claims: no claim buys a reply more weight or a longer step.
        """
        feedback = [self.replies[node] for node, _ in accepted]
        if not feedback or self._local_steps is None:
            return state, None
        steps = self._local_steps([claim for _, claim in accepted])
        direction = feedback_direction(feedback, self.full_gradient, self.clip)
        state, kept = guarded_feedback(
            state,
            self.policy,
            self.server_hidden,
            direction,
            self.step * self.learning_rate * steps,
            self.loss_fn,
            self.tolerance,
        )
        if kept < 1.0:
            log(
                INFO,
                "Round %d: hidden-unit feedback step %s (it raised the held-out server loss "
                "by more than the tolerance)",
                server_round,
                f"cut to {kept:g} of its size" if kept else "dropped",
            )
        return state, kept
