"""Per-position weighted averaging of sub-model updates (pure tensor code).

Each client saw only some units of each masked tensor. Every position of the
global model is moved by the weighted mean of the updates of the clients that
saw it (weights: their example counts); positions nobody saw do not move. This
is the HeteroFL/FjORD-style averaging FedQSN uses, applied to *updates*, so the
full-precision global model is never overwritten by quantized values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedqsn_flwr.core import kernels
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
    divisors : Mapping[str, float] (default: none)
        Tensors whose delta is in global units only once divided by this (in
        float32, as ``delta / divisor``; see :meth:`in_global_units`): the server
        keeps a reply's float16 or float32 values as they came and folds the
        division into aggregation, instead of a float32 copy per client.

    """

    deltas: Mapping[str, torch.Tensor]
    visible: UnitMask
    weight: float
    divisors: Mapping[str, float] = field(default_factory=dict)

    def in_global_units(self, name: str) -> torch.Tensor:
        """The float32 update of tensor ``name`` in global units (``deltas[name]`` if it is)."""
        delta = self.deltas[name].to(torch.float32)
        return delta / self.divisors[name] if name in self.divisors else delta


def apply_updates(
    state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    policy: MaskPolicy,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Return ``state`` plus the per-position weighted mean of ``updates``.

    Tensors absent from every update (e.g. integer buffers) are copied unchanged.
    Sums run in float64 so the result does not depend on summation order beyond
    float32 rounding of the final value. ``backend`` ``"auto"`` lets the compiled
    kernel (:func:`fedqsn_flwr.core.kernels.aggregate_rows`) compute the same
    values, bit for bit, for CPU float32 tensors when numba is installed: one pass
    over the updates, without float64 copies of them; ``"torch"`` forces the
    tensor code.
    """
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        having = [u for u in updates if name in u.deltas]
        if not having or not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        if backend == "auto" and _kernel_ready(tensor, [u.deltas[name] for u in having]):
            out[name] = _kernel_mean(name, tensor, having, policy)
            continue
        total = torch.zeros(tensor.shape, dtype=torch.float64, device=tensor.device)
        if name in policy.unit_axes:
            axis = policy.unit_axes[name]
            weight = torch.zeros(tensor.shape[axis], dtype=torch.float64, device=tensor.device)
            for update in having:
                units = update.visible[name]
                delta = update.in_global_units(name).to(torch.float64)
                total.index_add_(axis, units, delta * update.weight)
                weight[units] += update.weight
            shape = [1] * tensor.dim()
            shape[axis] = -1
            weight = weight.view(shape)
        else:
            weight = torch.tensor(0.0, dtype=torch.float64, device=tensor.device)
            for update in having:
                total += update.in_global_units(name).to(torch.float64) * update.weight
                weight += update.weight
        mean = torch.where(weight > 0, total / weight.clamp_min(1e-300), torch.zeros_like(total))
        out[name] = (tensor.to(torch.float64) + mean).to(tensor.dtype)
    return out


def _kernel_ready(tensor: torch.Tensor, deltas: list[torch.Tensor]) -> bool:
    """Whether the kernel takes ``tensor`` and ``deltas`` (CPU float32, deltas of one dtype)."""
    if not kernels.AVAILABLE or tensor.device.type != "cpu" or tensor.dtype != torch.float32:
        return False
    if tensor.numel() == 0:
        return False
    dtypes = {d.dtype for d in deltas}
    return (
        len(dtypes) == 1
        and dtypes <= {torch.float32, torch.float16}
        and all(d.device.type == "cpu" and d.is_contiguous() for d in deltas)
    )


def _kernel_mean(
    name: str, tensor: torch.Tensor, having: list[ClientUpdate], policy: MaskPolicy
) -> torch.Tensor:
    axis = policy.unit_axes.get(name, -1)
    out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    # deltas may be views of a reply's bytes: the kernel only reads them
    deltas = [u.deltas[name].detach().numpy() for u in having]
    kernels.aggregate_rows(
        tensor.detach().contiguous().view(-1).numpy(),
        tuple(tensor.shape),
        axis,
        deltas,
        [u.visible[name].cpu().numpy() if axis >= 0 else None for u in having],
        [u.divisors.get(name, 1.0) for u in having],
        [float(u.weight) for u in having],
        out.view(-1).numpy(),
    )
    return out


def sum_of_squares(values: torch.Tensor, divisor: float = 1.0) -> float:
    """Sum of ``float64(float32(x / divisor)) ** 2`` over ``values`` (float32 division).

    Not finite exactly when a value is not. See :func:`sums_of_squares`.
    """
    return sums_of_squares([values], [divisor])[0]


def sums_of_squares(values: Sequence[torch.Tensor], divisors: Sequence[float]) -> list[float]:
    """:func:`sum_of_squares` of every tensor with its divisor.

    CPU float32/float16 tensors go through the compiled kernel, all in one call
    and without float64 copies; the others through tensor code.
    """
    sums = [0.0] * len(values)
    batch = []
    for i, tensor in enumerate(values):
        if (
            kernels.AVAILABLE
            and tensor.device.type == "cpu"
            and tensor.dtype in (torch.float32, torch.float16)
        ):
            batch.append(i)
            continue
        # float64 (and other) tensors keep their own precision: a float32 copy of
        # 1e200 would be inf, and an infinite norm bound lets every update through
        keep = tensor.dtype if tensor.dtype == torch.float64 else torch.float32
        scaled = tensor.detach().to(keep)
        scaled = scaled / divisors[i] if divisors[i] != 1.0 else scaled
        sums[i] = float(scaled.double().pow(2).sum())
    if batch:
        arrays = [values[i].detach().numpy() for i in batch]
        found = kernels.many_scaled_squares(arrays, [divisors[i] for i in batch])
        for i, value in zip(batch, found, strict=True):
            sums[i] = value
    return sums
