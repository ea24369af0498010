"""Hidden-unit feedback with a server control variate (pure tensor code).

Server-hidden units (the server mask, p1) never leave the server, so plain
FedQSN never trains them: they keep their pretrained values. With *hidden-unit
feedback* each client also returns the gradient of its loss at the hidden
positions of its proxy (zero there; computing it needs no hidden value, see
:func:`fedqsn_flwr.flower.proxy.encode_feedback`). That gradient alone is a poor
estimate of the full model's gradient (measured: cosine 0.05), so the server
corrects it with a control variate from its own data D_s:

    direction = mean_c (clip(g_c) - g_p,c)  +  g_full

where g_c is client c's gradient on its data at its proxy, g_p,c the gradient of
the *same proxy* on D_s, and g_full the full global model's gradient on D_s, all
restricted to server-hidden units. The server steps its hidden units by
``-step * direction`` with ``step`` = the clients' learning rate x local steps x
``feedback-step``. Nothing a client receives changes: hidden units stay hidden.

It needs data of the server's own (samples of its pretraining data, not data
like the clients'); without any, it is refused.

No reply outweighs another: a client's g_c is clipped to ``clip`` times the
norm of its g_p,c and every reply counts the same (a claimed number of
examples would let one client set the direction), and the local steps come
from the low median of the claims (one claim among three or more cannot move
it beyond the honest ones). So one malicious reply moves hidden units only as
far as an honest one whose gradient is as large as the clip allows.

A step of learning rate x local steps along one gradient can overshoot where
the clients' many small steps do not (measured on digits at p1 = 0.7: hidden
units moved by 42% of their norm in round 1, the full-model gradient then grew
from 0.03 to 593 and the global model fell from 0.94 to 0.08 accuracy). So the
server keeps a step only if it raises the loss on *held-out* data of its own
(not the gradient sample) by at most a tolerance (2% by default), halving it up
to :data:`HALVINGS` times and otherwise dropping it (:func:`guarded_feedback`).
Not zero: the server's data is not the clients', and a useful step toward
theirs costs a little on it (measured on the shifted MNIST-1D flagship: every
full step raised the held-out loss by 0.5-1.4%, and a guard without tolerance
dropped all of them; the collapsing digits step raised it 7.3-fold).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedqsn_flwr.core.masking import MaskPolicy, UnitMask

#: Called with a model state; returns the mean loss gradient of every parameter
#: on the server's own data (state-dict names).
GradientFn = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
#: Called with a model state; returns its mean loss on held-out server data.
LossFn = Callable[[Mapping[str, torch.Tensor]], float]
#: How often a feedback step that raises the held-out loss is halved before it is dropped.
HALVINGS = 5


@dataclass(frozen=True)
class ClientFeedback:
    """One client's feedback at the server-hidden units, and its control variate.

    Parameters
    ----------
    gradient : Mapping[str, torch.Tensor]
        g_c: the client's gradient, slices of the server-hidden units.
    reference : Mapping[str, torch.Tensor]
        g_p,c: the server's gradient of the same proxy on its data, same slices.

    """

    gradient: Mapping[str, torch.Tensor]
    reference: Mapping[str, torch.Tensor]


def server_hidden(policy: MaskPolicy, server_mask: UnitMask) -> dict[str, torch.Tensor]:
    """The server-hidden units of every masked tensor (sorted, int64)."""
    out: dict[str, torch.Tensor] = {}
    for name, count in policy.unit_counts.items():
        keep = torch.ones(count, dtype=torch.bool)
        keep[server_mask[name].cpu()] = False
        out[name] = keep.nonzero().flatten()
    return out


def hidden_slices(
    gradients: Mapping[str, torch.Tensor],
    policy: MaskPolicy,
    hidden: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The slices of ``gradients`` at the ``hidden`` units (float32, CPU)."""
    return {
        name: gradients[name]
        .detach()
        .cpu()
        .to(torch.float32)
        .index_select(policy.unit_axes[name], units)
        for name, units in hidden.items()
        if units.numel()
    }


def select_units(
    values: torch.Tensor, axis: int, among: torch.Tensor, wanted: torch.Tensor
) -> torch.Tensor:
    """Slices of ``values`` (laid out along ``among``, sorted) at the ``wanted`` units."""
    positions = torch.searchsorted(among, wanted)
    return values.index_select(axis, positions)


def _norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def feedback_direction(
    feedback: Sequence[ClientFeedback],
    full_gradient: Mapping[str, torch.Tensor],
    clip: float = 5.0,
) -> dict[str, torch.Tensor]:
    """mean_c (clip(g_c) - g_p,c) + g_full per tensor, every reply weighted the same."""
    out = {name: g.to(torch.float64).clone() for name, g in full_gradient.items()}
    for item in feedback:
        bound = clip * _norm(item.reference)
        norm = _norm(item.gradient)
        factor = min(1.0, bound / norm) if norm > 0 else 1.0
        for name in out:
            diff = item.gradient[name].double() * factor - item.reference[name].double()
            out[name] += diff / len(feedback)
    return {name: g.to(torch.float32) for name, g in out.items()}


def local_steps(claims: Sequence[float], epochs: int, batch_size: int) -> int:
    """Local steps of a client with the low median of the claimed example counts."""
    return epochs * math.ceil(statistics.median_low(claims) / batch_size)


def apply_feedback(
    state: Mapping[str, torch.Tensor],
    policy: MaskPolicy,
    hidden: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
    step: float,
) -> dict[str, torch.Tensor]:
    """``state`` with its ``hidden`` units moved by ``-step * direction`` (others unchanged)."""
    out = dict(state)
    for name, values in direction.items():
        tensor = state[name].clone()
        units = hidden[name].to(tensor.device)
        tensor.index_add_(policy.unit_axes[name], units, values.to(tensor) * -step)
        out[name] = tensor
    return out


def guarded_feedback(
    state: Mapping[str, torch.Tensor],
    policy: MaskPolicy,
    hidden: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
    step: float,
    loss_fn: LossFn,
    tolerance: float = 0.02,
) -> tuple[dict[str, torch.Tensor], float]:
    """:func:`apply_feedback` with the largest step the held-out loss tolerates.

    Tries ``step``, ``step / 2``, ... (:data:`HALVINGS` halvings) and keeps the
    first that does not raise ``loss_fn`` above ``1 + tolerance`` times its value
    at ``state`` (the server's data is not the clients': a step toward theirs may
    cost a little on it, see the module docstring). Returns
    the new state and the fraction of ``step`` kept (0: ``state`` itself, when
    no step helped or the held-out loss is not finite).
    """
    before = loss_fn(state)
    if not math.isfinite(before):
        return dict(state), 0.0
    fraction = 1.0
    for _ in range(HALVINGS + 1):
        stepped = apply_feedback(state, policy, hidden, direction, step * fraction)
        if loss_fn(stepped) <= before * (1.0 + tolerance):
            return stepped, fraction
        fraction /= 2
    return dict(state), 0.0
