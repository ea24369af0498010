"""The wire format of FedQSN: proxies to clients, updates back to the server.

This is the only module that knows how a proxy is laid out in Flower records.

A proxy message holds one :class:`~flwr.app.ArrayRecord` (``"proxy"``) and one
:class:`~flwr.app.ConfigRecord` (``"proxy-layout"``). For every tensor ``name``:

* masked tensors carry ``name/units``: the indices of the units the client sees
  (int32). Only those slices are serialized -- hidden units are *absent*, not
  zeros;
* quantized tensors carry ``name/codes`` (uint8, bit-packed NF-k codes of the
  visible values, scaled) and ``name/scales`` (float32, one absmax per block);
* other tensors carry ``name`` (float32 visible values, scaled).

The layout record holds ``shape/name`` (full dense shape), ``axis/name`` (unit
axis, -1 when unmasked), ``tensors`` (names in state-dict order), ``bit-width``
(0 when unquantized) and ``block-size``.

A client's reply holds an ArrayRecord ``"update"`` with ``name`` -> float32
``trained - received`` restricted to the visible units (same shape as the
visible slice), for every floating-point tensor of the proxy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .masking import MaskPolicy, UnitMask, take_units, unit_scale
from .quantization import dequantize, num_blocks, pack_bits, quantize, unpack_bits

PROXY_RECORD = "proxy"
LAYOUT_RECORD = "proxy-layout"
UPDATE_RECORD = "update"


class InvalidUpdate(ValueError):
    """A client update that cannot be aggregated (the message says why)."""


@dataclass(frozen=True)
class ProxySpec:
    """What the server sent one client; enough to map its update back.

    Parameters
    ----------
    visible : UnitMask
        Units the client saw, per masked tensor.
    update_shapes : dict[str, tuple[int, ...]]
        Expected shape of every tensor in the client's update.

    """

    visible: UnitMask
    update_shapes: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Proxy:
    """A proxy rebuilt on the client.

    Parameters
    ----------
    state : dict[str, torch.Tensor]
        Dense state dict; hidden units are zero.
    unit_axes : dict[str, int]
        Unit axis of every masked tensor.
    visible : UnitMask
        Visible units of every masked tensor.

    """

    state: dict[str, torch.Tensor]
    unit_axes: dict[str, int]
    visible: UnitMask

    def hidden_masks(self) -> dict[str, torch.Tensor]:
        """Boolean masks of the hidden entries of every masked tensor.

        Pass them to the training loop as entries that must stay zero, so the
        client trains exactly the subnetwork it was given.
        """
        return {
            name: mask for name in self.unit_axes if (mask := self.hidden_mask(name)) is not None
        }

    def hidden_mask(self, name: str) -> torch.Tensor | None:
        """Boolean tensor, True where ``name`` is hidden; None when unmasked."""
        if name not in self.unit_axes:
            return None
        tensor, axis = self.state[name], self.unit_axes[name]
        keep = torch.zeros(tensor.shape[axis], dtype=torch.bool)
        keep[self.visible[name]] = True
        shape = [1] * tensor.dim()
        shape[axis] = tensor.shape[axis]
        return (~keep).view(shape).expand_as(tensor)


def _visible_values(
    state: Mapping[str, torch.Tensor], name: str, policy: MaskPolicy, visible: UnitMask
) -> torch.Tensor:
    tensor = state[name].detach()
    if name not in policy.unit_axes:
        return tensor.to(torch.float32)
    axis, units = policy.unit_axes[name], visible[name]
    scale = unit_scale(policy.unit_counts[name], units)
    return take_units(tensor, axis, units).to(torch.float32) * scale


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


def encode_proxy(
    state: Mapping[str, torch.Tensor],
    policy: MaskPolicy,
    visible: UnitMask,
    bit_width: int | None,
    block_size: int,
) -> tuple[ArrayRecord, ConfigRecord, ProxySpec]:
    """Serialize the proxy of ``state`` defined by a client's ``visible`` units.

    Parameters
    ----------
    state : Mapping[str, torch.Tensor]
        The full-precision global model (state-dict names).
    policy : MaskPolicy
        Masked/quantized tensors.
    visible : UnitMask
        The client's visible units (already inside the server-visible set).
    bit_width : int | None
        NF-k bits, or None to send float32 values.
    block_size : int
        Values per absmax block.

    Returns
    -------
    tuple[ArrayRecord, ConfigRecord, ProxySpec]
        The proxy arrays, their layout, and the spec the server keeps to map the
        reply back.

    """
    arrays: dict[str, Array] = {}
    layout = ConfigRecord(
        {
            "tensors": list(state),
            "bit-width": bit_width or 0,
            "block-size": block_size,
        }
    )
    update_shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in state.items():
        layout[f"shape/{name}"] = list(tensor.shape)
        layout[f"axis/{name}"] = policy.unit_axes.get(name, -1)
        if not tensor.is_floating_point():
            arrays[name] = Array(_numpy(tensor))
            continue
        values = _visible_values(state, name, policy, visible)
        update_shapes[name] = tuple(values.shape)
        if name in policy.unit_axes:
            arrays[f"{name}/units"] = Array(_numpy(visible[name].to(torch.int32)))
        if bit_width is not None and name in policy.quantized:
            codes, scales = quantize(values, bit_width, block_size)
            arrays[f"{name}/codes"] = Array(_numpy(pack_bits(codes, bit_width)))
            arrays[f"{name}/scales"] = Array(_numpy(scales))
        else:
            arrays[name] = Array(_numpy(values))
    spec = ProxySpec(
        visible={name: units.clone() for name, units in visible.items()},
        update_shapes=update_shapes,
    )
    return ArrayRecord(arrays), layout, spec


def _tensor(arrays: ArrayRecord, key: str) -> torch.Tensor:
    if key not in arrays:
        raise KeyError(f"proxy is missing array '{key}'")
    return torch.from_numpy(arrays[key].numpy().copy())


def decode_proxy(arrays: ArrayRecord, layout: ConfigRecord) -> Proxy:
    """Rebuild the dense proxy a client trains (hidden units are zero)."""
    bit_width = int(layout["bit-width"])
    block_size = int(layout["block-size"])
    state: dict[str, torch.Tensor] = {}
    unit_axes: dict[str, int] = {}
    visible: UnitMask = {}
    for name in layout["tensors"]:
        shape = tuple(int(d) for d in layout[f"shape/{name}"])
        axis = int(layout[f"axis/{name}"])
        if f"{name}/codes" in arrays:
            units = _tensor(arrays, f"{name}/units").long() if axis >= 0 else None
            slice_shape = list(shape)
            if units is not None:
                slice_shape[axis] = units.numel()
            count = int(np.prod(slice_shape))
            scales = _tensor(arrays, f"{name}/scales")
            if scales.numel() != num_blocks(count, block_size):
                raise ValueError(f"proxy tensor '{name}' has {scales.numel()} scales")
            codes = unpack_bits(_tensor(arrays, f"{name}/codes"), bit_width, count)
            values = dequantize(codes, scales, bit_width, block_size).view(slice_shape)
        else:
            values = _tensor(arrays, name)
            units = _tensor(arrays, f"{name}/units").long() if axis >= 0 else None
        if units is None:
            state[name] = values.reshape(shape)
            continue
        dense = torch.zeros(shape, dtype=values.dtype)
        dense.index_copy_(axis, units, values)
        state[name] = dense
        unit_axes[name] = axis
        visible[name] = units
    return Proxy(state=state, unit_axes=unit_axes, visible=visible)


def received_model(content: RecordDict, arrays_key: str = "arrays") -> Proxy:
    """The model a training message carries: a FedQSN proxy, or FedAvg's plain arrays."""
    if PROXY_RECORD in content.array_records:
        return decode_proxy(content[PROXY_RECORD], content[LAYOUT_RECORD])
    state = content.array_records[arrays_key].to_torch_state_dict()
    return Proxy(state=state, unit_axes={}, visible={})


def encode_update(trained: Mapping[str, torch.Tensor], proxy: Proxy) -> ArrayRecord:
    """A client's reply: ``trained - received`` on the visible units only."""
    arrays: dict[str, Array] = {}
    for name, received in proxy.state.items():
        if not received.is_floating_point():
            continue
        delta = trained[name].detach().cpu().to(torch.float32) - received.to(torch.float32)
        if name in proxy.unit_axes:
            delta = take_units(delta, proxy.unit_axes[name], proxy.visible[name])
        arrays[name] = Array(_numpy(delta))
    return ArrayRecord(arrays)


def decode_update(
    update: ArrayRecord, spec: ProxySpec, policy: MaskPolicy
) -> dict[str, torch.Tensor]:
    """Validate a client's update and undo the unit scaling.

    Returns the update of every tensor in global units, still restricted to the
    units the client saw (``spec.visible``). Raises :class:`InvalidUpdate` naming
    the first problem: a missing or extra key, a wrong shape or dtype, NaN/Inf.
    """
    expected, received = set(spec.update_shapes), set(update.keys())
    if missing := sorted(expected - received):
        raise InvalidUpdate(f"missing update for {missing}")
    if extra := sorted(received - expected):
        raise InvalidUpdate(f"unexpected arrays {extra}")
    deltas: dict[str, torch.Tensor] = {}
    for name, shape in spec.update_shapes.items():
        array = update[name]
        if array.dtype != "float32":
            raise InvalidUpdate(f"'{name}' has dtype {array.dtype}, expected float32")
        if tuple(array.shape) != shape:
            raise InvalidUpdate(f"'{name}' has shape {tuple(array.shape)}, expected {shape}")
        delta = torch.from_numpy(array.numpy().copy())
        if not bool(torch.isfinite(delta).all()):
            raise InvalidUpdate(f"'{name}' holds NaN or Inf")
        if name in policy.unit_axes:
            delta = delta / unit_scale(policy.unit_counts[name], spec.visible[name])
        deltas[name] = delta
    return deltas
