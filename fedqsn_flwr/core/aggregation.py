"""Per-position weighted averaging of sub-model updates (pure tensor code).

Each client saw only some units of each masked tensor. Every position of the
global model is moved by the weighted mean of the updates of the clients that
saw it (weights: their example counts); positions nobody saw do not move. This
is the HeteroFL/FjORD-style averaging FedQSN uses, applied to *updates*, so the
full-precision global model is never overwritten by quantized values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedqsn_flwr.core.masking import MaskPolicy, UnitMask


@dataclass(frozen=True)
class ClientUpdate:
    """One client's update in global units, restricted to the units it saw.

    Parameters
    ----------
    deltas : Mapping[str, torch.Tensor]
        Per tensor: the update; masked tensors hold only the visible slices.
    visible : UnitMask
        The units the client saw, per masked tensor.
    weight : float
        Its weight (number of training examples).

    """

    deltas: Mapping[str, torch.Tensor]
    visible: UnitMask
    weight: float


def apply_updates(
    state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    policy: MaskPolicy,
) -> dict[str, torch.Tensor]:
    """Return ``state`` plus the per-position weighted mean of ``updates``.

    Tensors absent from every update (e.g. integer buffers) are copied unchanged.
    Sums run in float64 so the result does not depend on summation order beyond
    float32 rounding of the final value.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        having = [u for u in updates if name in u.deltas]
        if not having or not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        total = torch.zeros(tensor.shape, dtype=torch.float64, device=tensor.device)
        if name in policy.unit_axes:
            axis = policy.unit_axes[name]
            weight = torch.zeros(tensor.shape[axis], dtype=torch.float64, device=tensor.device)
            for update in having:
                units = update.visible[name]
                total.index_add_(axis, units, update.deltas[name].to(torch.float64) * update.weight)
                weight[units] += update.weight
            shape = [1] * tensor.dim()
            shape[axis] = -1
            weight = weight.view(shape)
        else:
            weight = torch.tensor(0.0, dtype=torch.float64, device=tensor.device)
            for update in having:
                total += update.deltas[name].to(torch.float64) * update.weight
                weight += update.weight
        mean = torch.where(weight > 0, total / weight.clamp_min(1e-300), torch.zeros_like(total))
        out[name] = (tensor.to(torch.float64) + mean).to(tensor.dtype)
    return out
