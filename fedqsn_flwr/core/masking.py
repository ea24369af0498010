"""Server and client masks over structured units (pure tensor code).

Terminology, as in the paper:

* A *unit* is one slice of a weight tensor along its *unit axis*: an input
  feature (a column of a ``Linear`` weight, axis 1), an input channel of a
  convolution (axis 1). Hiding a unit zeroes that whole slice, i.e. it drops one
  hidden feature coming from the previous layer.
* The *server mask* hides a fraction ``server_mask_ratio`` (the paper's **p1**) of
  the units of every masked tensor, once per run. Hidden units never leave the
  server.
* A *client mask* hides a further fraction ``client_mask_ratio`` (the paper's
  **p2**) of the units the server mask left visible. A fresh one is drawn for
  every sampled client in every round.
* Visible units are scaled by ``num_units / num_visible`` -- the exact form of the
  paper's inverted-dropout factor ``1/(1-p)`` (``1/((1-p1)(1-p2))`` for a client),
  which keeps the expected activation of the next layer unchanged.

The :class:`MaskPolicy` says which tensors are masked and along which axis. The
default (:func:`policy_for_model`) masks the units *between* layers only: the
first weight layer's input (raw pixels) and the output logits are never masked,
as in the authors' code, because hiding input features or classes costs far more
accuracy than hiding hidden features.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

#: Visible unit indices per masked tensor name (sorted, int64).
UnitMask = dict[str, torch.Tensor]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class MaskPolicy:
    """Which tensors of a model are masked and quantized.

    Parameters
    ----------
    unit_axes : Mapping[str, int]
        Masked tensors (state-dict names) and the axis along which a unit lies.
    unit_counts : Mapping[str, int]
        Number of units of every masked tensor (its size along the unit axis).
    quantized : frozenset[str]
        Tensors sent as NormalFloat codes (when quantization is on); all other
        tensors are sent in float32.

    """

    unit_axes: Mapping[str, int]
    unit_counts: Mapping[str, int]
    quantized: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if set(self.unit_axes) != set(self.unit_counts):
            raise ValueError("unit_axes and unit_counts must name the same tensors")

    def describe(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Share of the model's parameters that are masked and quantized."""
        total = sum(t.numel() for t in state.values())
        masked = sum(state[name].numel() for name in self.unit_axes)
        quantized = sum(state[name].numel() for name in self.quantized)
        return {
            "parameters": float(total),
            "masked_share": masked / total,
            "quantized_share": quantized / total,
        }


def policy_for_model(model: nn.Module, mask_input_layer: bool = False) -> MaskPolicy:
    """Build the default :class:`MaskPolicy` for ``model``.

    If the model defines ``fedqsn_unit_axes()`` (state-dict name -> unit axis),
    exactly those tensors are masked. Otherwise every ``Linear``/``Conv`` weight
    is masked along axis 1 (its input features or channels), except the first
    such layer -- whose input is the raw data -- unless ``mask_input_layer`` is
    set. Every floating-point *parameter* is quantized; floating-point buffers
    (BatchNorm's running statistics) travel in float32, because rounding a running
    variance to a 4-bit level can make it zero.
    """
    unit_axes: dict[str, int] = {}
    state = model.state_dict()
    declared = getattr(model, "fedqsn_unit_axes", None)
    if callable(declared):
        unit_axes = dict(declared())
        unknown = sorted(set(unit_axes) - set(state))
        if unknown:
            raise ValueError(f"fedqsn_unit_axes() names tensors the model does not have: {unknown}")
    else:
        first = True
        for module_name, module in model.named_modules():
            if not isinstance(module, _WEIGHT_LAYERS):
                continue
            if first and not mask_input_layer:
                first = False
                continue
            first = False
            unit_axes[f"{module_name}.weight" if module_name else "weight"] = 1
    unit_counts = {name: int(state[name].shape[axis]) for name, axis in unit_axes.items()}
    quantized = frozenset(
        name for name, tensor in model.named_parameters() if tensor.is_floating_point()
    )
    return MaskPolicy(unit_axes=unit_axes, unit_counts=unit_counts, quantized=quantized)


def derive_seed(purpose: str, *keys: int) -> int:
    """A 63-bit seed for ``purpose`` from integer keys (run seed, round, node, ...).

    Injective: a hash of the purpose comes first (domain separation: sampling
    and client training never share a seed), then the number of keys, then
    every key as exactly two 32-bit words. (numpy's ``SeedSequence`` pads short
    entropy with zero words, which made ``(s, r, 1, 0)`` and ``(s, r, 1)``
    collide, and splits each integer into as many words as it needs, which lets
    ``(2**32, 5)`` and ``(0, 1 + 5 * 2**32)`` collide.) Keys are in 0..2**64-1.
    Seeds a client must not predict come from the server secret instead
    (:func:`fedqsn_flwr.core.secret.secret_seed`).
    """
    tag = int.from_bytes(hashlib.blake2b(purpose.encode(), digest_size=8).digest(), "little")
    words = [tag & 0xFFFFFFFF, tag >> 32, len(keys)]
    for key in keys:
        key = int(key)
        if not 0 <= key < 2**64:
            raise ValueError(f"derive_seed keys are 0..2**64-1, got {key}")
        words += [key & 0xFFFFFFFF, key >> 32]
    state = np.random.SeedSequence(words)
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def num_hidden(num_units: int, ratio: float) -> int:
    """Units hidden out of ``num_units`` at ``ratio``; at least one stays visible."""
    return min(math.floor(ratio * num_units + 0.5), num_units - 1)


def _keep(units: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    hidden = num_hidden(units.numel(), ratio)
    order = torch.randperm(units.numel(), generator=generator)
    return torch.sort(units[order[hidden:]]).values


def draw_server_mask(policy: MaskPolicy, ratio: float, seed: int) -> UnitMask:
    """Visible units per masked tensor after hiding ``ratio`` (p1) of them."""
    generator = torch.Generator().manual_seed(derive_seed("server-mask", seed))
    return {
        name: _keep(torch.arange(count), ratio, generator)
        for name, count in sorted(policy.unit_counts.items())
    }


def draw_client_mask(server_mask: UnitMask, ratio: float, seed: int) -> UnitMask:
    """Units a client sees: ``ratio`` (p2) of the server-visible units hidden again.

    ``seed`` should be derived from the run seed, the round and the client
    (:func:`derive_seed`) so that every client gets a fresh, reproducible mask.
    """
    generator = torch.Generator().manual_seed(seed)
    return {name: _keep(units, ratio, generator) for name, units in sorted(server_mask.items())}


def unit_scale(num_units: int, visible: torch.Tensor) -> float:
    """Inverted-dropout factor for a tensor whose ``visible`` units are kept."""
    return num_units / visible.numel()


def take_units(tensor: torch.Tensor, axis: int, visible: torch.Tensor) -> torch.Tensor:
    """The visible slices of ``tensor`` along ``axis`` (hidden ones are dropped)."""
    return tensor.index_select(axis, visible.to(tensor.device))


def apply_mask(
    state: Mapping[str, torch.Tensor], policy: MaskPolicy, mask: UnitMask
) -> dict[str, torch.Tensor]:
    """Dense copy of ``state`` with hidden units zeroed and visible ones rescaled.

    This is the model a mask defines (e.g. the paper's *server model* for the
    server mask); unmasked tensors are copied unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name not in policy.unit_axes:
            out[name] = tensor.clone()
            continue
        axis, visible = policy.unit_axes[name], mask[name]
        dense = torch.zeros_like(tensor)
        scale = unit_scale(policy.unit_counts[name], visible)
        dense.index_copy_(
            axis, visible.to(tensor.device), take_units(tensor, axis, visible) * scale
        )
        out[name] = dense
    return out
