"""Hidden-unit feedback with a server control variate (pure tensor code).

Server-hidden units (the server mask, p1) never leave the server, so plain
FedQSN never trains them: they keep their pretrained values. With *hidden-unit
feedback* each client also returns the gradient of its loss at the hidden
positions of its proxy (zero there; computing it needs no hidden value, see
:func:`fedqsn_flwr.flower.proxy.encode_feedback`). That gradient alone is a poor
estimate of the full model's gradient (measured: cosine 0.05), so the server
corrects it with a control variate from its own data D_s:

    direction = mean_c w_c (g_c - g_p,c) / sum_c w_c  +  g_full

where g_c is client c's gradient on its data at its proxy, g_p,c the gradient of
the *same proxy* on D_s, and g_full the full global model's gradient on D_s, all
restricted to server-hidden units. The server steps its hidden units by
``-step * direction`` with ``step`` = the clients' learning rate x local steps x
``feedback-step``. Nothing a client receives changes: hidden units stay hidden.

It needs data of the server's own (a sample of its pretraining data, not data
like the clients'); without any, it is refused.

A client's g_c is clipped to ``clip`` times the norm of its g_p,c, so one
malicious reply can move hidden units only as far as an honest gradient of the
size the server itself computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedqsn_flwr.core.masking import MaskPolicy, UnitMask

#: Called with a model state; returns the mean loss gradient of every parameter
#: on the server's own data (state-dict names).
GradientFn = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ClientFeedback:
    """One client's feedback at the server-hidden units, and its control variate.

    Parameters
    ----------
    gradient : Mapping[str, torch.Tensor]
        g_c: the client's gradient, slices of the server-hidden units.
    reference : Mapping[str, torch.Tensor]
        g_p,c: the server's gradient of the same proxy on its data, same slices.
    weight : float
        The client's number of training examples.

    """

    gradient: Mapping[str, torch.Tensor]
    reference: Mapping[str, torch.Tensor]
    weight: float


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
    """mean_c w_c (g_c - g_p,c) + g_full per tensor (see the module docstring)."""
    total = sum(f.weight for f in feedback)
    out = {name: g.to(torch.float64).clone() for name, g in full_gradient.items()}
    if total <= 0:
        return {name: g.to(torch.float32) for name, g in out.items()}
    for item in feedback:
        bound = clip * _norm(item.reference)
        norm = _norm(item.gradient)
        factor = min(1.0, bound / norm) if norm > 0 else 1.0
        for name in out:
            diff = item.gradient[name].double() * factor - item.reference[name].double()
            out[name] += diff * (item.weight / total)
    return {name: g.to(torch.float32) for name, g in out.items()}


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
