"""The wire format of FedQSN: proxies to clients, updates back to the server.

This is the only module that knows how a proxy is laid out in Flower records.

A proxy message holds one :class:`~flwr.app.ArrayRecord` (``"proxy"``) and one
:class:`~flwr.app.ConfigRecord` (``"proxy-layout"``). The arrays concatenate the
tensors in state-dict order, one array per kind (each Flower array costs about
180 bytes of framing, a tenth of a small model's proxy):

* ``proxy/units`` (uint8): a bitmask over the units of every masked tensor, 1 =
  visible. Only visible slices are serialized -- hidden units are *absent*, not
  zeros;
* ``proxy/codes`` (uint8): the bit-packed NF-k codes of the visible values
  (scaled) of every quantized tensor, each starting on a byte boundary;
* ``proxy/scales``: their absmax per block, float16 when every scale is a normal
  float16 number, else float32;
* ``proxy/values`` (float32): the visible values of tensors sent unquantized;
* non-float tensors (e.g. BatchNorm's counter) under their own name.

The layout record holds ``shape/name`` (full dense shape), ``axis/name`` (unit
axis, -1 when unmasked), ``tensors`` (names in state-dict order), ``quantized``
(names sent as codes), ``bit-width`` (0 when unquantized), ``block-size`` and
``update-bit-width`` (how the client must encode its reply). Every offset follows
from these, and the decoder checks that every array is used up exactly.

A client's reply holds an ArrayRecord ``"update"`` with ``trained - received``
restricted to the visible units (same shape as the visible slice), for every
floating-point tensor of the proxy, encoded as the layout asks:

* ``update-bit-width`` 32: ``name`` -> float32 (exact);
* 16: ``name`` -> float16 (half the bytes, relative rounding error <= 2**-11);
* 2..8: ``name/codes`` and ``name/scales``: the update NF-k quantized like the
  proxy (block size ``block-size``).
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedqsn_flwr.core.aggregation import ClientUpdate, sums_of_squares
from fedqsn_flwr.core.masking import MaskPolicy, UnitMask, take_units, unit_scale
from fedqsn_flwr.core.quantization import (
    MAX_BIT_WIDTH,
    MIN_BIT_WIDTH,
    dequantize_into_units,
    dequantize_packed,
    num_blocks,
    packed_size,
    quantize_packed,
)
from fedqsn_flwr.core.similarity import code_squares
from fedqsn_flwr.flower.protocol import (
    LAYOUT_RECORD,
    PROXY_RECORD,
)

#: Keys of the proxy's concatenated arrays (tensor names never start with "proxy/").
UNITS_KEY, CODES_KEY, SCALES_KEY, VALUES_KEY = (
    "proxy/units",
    "proxy/codes",
    "proxy/scales",
    "proxy/values",
)
#: Allowed ``update-bit-width`` values: float32, float16, or NF-k codes.
UPDATE_BIT_WIDTHS = (32, 16, *range(MIN_BIT_WIDTH, MAX_BIT_WIDTH + 1))
_FLOAT16_MIN_NORMAL = float(torch.finfo(torch.float16).tiny)
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


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
    update_bit_width : int (default: 32)
        How the client was asked to encode its update (see the module docstring).
    block_size : int (default: 64)
        Block size of a quantized update.

    """

    visible: UnitMask
    update_shapes: dict[str, tuple[int, ...]]
    update_bit_width: int = 32
    block_size: int = 64


@dataclass(frozen=True)
class PackedTensor:
    """One tensor of a proxy message as it travels, checked against the layout.

    Parameters
    ----------
    name : str
        State-dict name.
    shape : tuple[int, ...]
        Full dense shape.
    axis : int
        Unit axis, -1 when unmasked.
    units : torch.Tensor | None
        Visible units along ``axis`` (None when unmasked).
    packed : torch.Tensor | None
        Bit-packed NF-k codes of the visible slice (None when not quantized).
    scales : torch.Tensor | None
        Their float32 block scales.
    values : torch.Tensor | None
        The visible slice's float32 values when sent unquantized, or a non-float
        tensor's values (then ``axis`` is -1).

    """

    name: str
    shape: tuple[int, ...]
    axis: int
    units: torch.Tensor | None
    packed: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def slice_shape(self) -> tuple[int, ...]:
        """Shape of the visible slice (the full shape when unmasked)."""
        if self.units is None:
            return self.shape
        out = list(self.shape)
        out[self.axis] = self.units.numel()
        return tuple(out)

    @property
    def unit_factor(self) -> float:
        """The factor that undoes the unit scaling (1 when unmasked)."""
        if self.units is None:
            return 1.0
        return self.units.numel() / self.shape[self.axis]


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
    update_bit_width : int (default: 32)
        How the server wants the update encoded.
    block_size : int (default: 64)
        Block size of a quantized update (and of the proxy's codes).
    bit_width : int (default: 0)
        Bit width of the proxy's codes (0: sent unquantized).
    received : dict[str, PackedTensor] | None (default: None)
        The message's tensors, still packed, when ``state`` is the client's own
        model (``decode_proxy(..., into=...)``): :func:`encode_update` then takes
        the received values from here, since ``state`` has been trained in place.
    arrays_key : str | None (default: None)
        None for a FedQSN proxy; the record's key when the message carried
        FedAvg's plain arrays (the reply then carries plain arrays too).

    """

    state: Mapping[str, torch.Tensor]
    unit_axes: dict[str, int]
    visible: UnitMask
    update_bit_width: int = 32
    block_size: int = 64
    bit_width: int = 0
    received: dict[str, PackedTensor] | None = None
    arrays_key: str | None = None

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
    # index_select returns a new tensor: scaling it in place saves a model-sized
    # allocation (its page faults cost more than the multiply)
    return take_units(tensor, axis, units).to(torch.float32).mul_(scale)


@functools.lru_cache(maxsize=4096)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The exact ``.npy`` header numpy writes for a C-order array of ``descr``, ``shape``."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def array_values(array: Array) -> np.ndarray:
    """The values of a Flower :class:`~flwr.app.Array` as a read-only numpy view.

    Same values as ``array.numpy()``, which parses the ``.npy`` header with
    ``ast.literal_eval`` -- about 0.1 ms per array, the largest cost of decoding
    a small model's update. Here the header is compared byte for byte with the
    one numpy writes for the declared dtype and shape, and the size checked;
    anything else falls back to ``array.numpy()``, whose result must be exactly
    the declared shape and dtype (:class:`InvalidUpdate` otherwise).
    """
    data = array.data
    if array.stype == "numpy.ndarray" and data[:6] == b"\x93NUMPY":
        try:
            dtype = np.dtype(array.dtype)
            shape = tuple(int(n) for n in array.shape)
        except (TypeError, ValueError) as err:
            raise InvalidUpdate(f"array declares dtype {array.dtype!r}") from err
        if min(shape, default=0) >= 0:
            header = _npy_header(dtype.str, shape)
            count = math.prod(shape)
            if data[: len(header)] == header and len(data) - len(header) == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(
                    shape
                )
    return _strict_numpy(array)


def _strict_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, whose result must be exactly the declared shape and dtype.

    Flower's ``Array`` carries a declared shape and dtype beside its bytes; the
    bytes (a ``.npy`` file) carry their own. A reply whose two disagree -- a bias
    declared (128,) holding one scalar that would broadcast, a buffer cut short
    or holding more columns than declared -- is refused here, as is anything that
    does not decode.
    """
    if array.stype != "numpy.ndarray":
        raise InvalidUpdate(f"array stype {array.stype!r} is not 'numpy.ndarray'")
    try:
        declared = np.dtype(array.dtype)
        values = array.numpy()
    except Exception as err:  # any parse error of untrusted bytes means the same
        raise InvalidUpdate(f"array bytes do not decode ({type(err).__name__})") from err
    if not isinstance(values, np.ndarray):
        raise InvalidUpdate("array bytes do not hold an ndarray")
    if values.dtype != declared or values.shape != tuple(array.shape):
        raise InvalidUpdate(
            f"array bytes hold {values.dtype}{values.shape}, declared "
            f"{array.dtype}{tuple(array.shape)}"
        )
    return values


def _all_finite(tensor: torch.Tensor) -> bool:
    # numpy's check costs a fraction of torch's dispatch on the small tensors of
    # typical layers, and it runs for every tensor of every reply.
    if tensor.device.type == "cpu":
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


def compact_scales(scales: torch.Tensor) -> torch.Tensor:
    """Block scales as float16 when that keeps every one a normal number, else float32.

    Rounding a scale to float16 moves a dequantized value by at most 2**-11 of
    itself, far below the quantization step of any bit width used here, and saves
    2 of the ~4.5 bits per value of the 4-bit format's scale overhead.
    """
    nonzero = scales[scales != 0].abs()
    if nonzero.numel() == 0 or (
        float(nonzero.min()) >= _FLOAT16_MIN_NORMAL and float(nonzero.max()) <= _FLOAT16_MAX
    ):
        return scales.to(torch.float16)
    return scales.to(torch.float32)


def _quantized_arrays(
    name: str, values: torch.Tensor, bit_width: int, block_size: int
) -> dict[str, Array]:
    packed, scales = quantize_packed(values, bit_width, block_size)
    return {
        f"{name}/codes": Array(_numpy(packed)),
        f"{name}/scales": Array(_numpy(compact_scales(scales))),
    }


def _dequantized(
    arrays: ArrayRecord, name: str, bit_width: int, block_size: int, count: int
) -> torch.Tensor:
    """Values of ``name/codes`` and ``name/scales``, checked against ``count``."""
    scales_array = arrays[f"{name}/scales"]
    if scales_array.dtype not in ("float16", "float32"):
        raise ValueError(f"'{name}/scales' has dtype {scales_array.dtype}")
    scales = _tensor(arrays, f"{name}/scales").to(torch.float32)
    if scales.numel() != num_blocks(count, block_size):
        raise ValueError(f"'{name}' has {scales.numel()} scales for {count} values")
    if not _all_finite(scales):
        raise ValueError(f"'{name}/scales' holds NaN or Inf")
    codes = _tensor(arrays, f"{name}/codes")
    if codes.dtype != torch.uint8 or codes.numel() != packed_size(count, bit_width):
        raise ValueError(
            f"'{name}/codes' has {codes.numel()} {codes.dtype} values; expected "
            f"{packed_size(count, bit_width)} uint8 for {count} codes of {bit_width} bits"
        )
    return dequantize_packed(codes, scales, bit_width, block_size, count)


def proxy_layout(
    state: Mapping[str, torch.Tensor],
    policy: MaskPolicy,
    *,
    bit_width: int | None,
    block_size: int,
    update_bit_width: int = 32,
) -> ConfigRecord:
    """The layout record of every proxy of ``state`` (see the module docstring)."""
    if update_bit_width not in UPDATE_BIT_WIDTHS:
        raise ValueError(f"update bit width must be one of {UPDATE_BIT_WIDTHS}")
    quantized = [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and bit_width is not None and name in policy.quantized
    ]
    entries: dict[str, Any] = {
        "tensors": list(state),
        "bit-width": bit_width or 0,
        "block-size": block_size,
        "update-bit-width": update_bit_width,
        "quantized": quantized,
    }
    for name, tensor in state.items():
        entries[f"shape/{name}"] = list(tensor.shape)
        entries[f"axis/{name}"] = policy.unit_axes.get(name, -1)
    return ConfigRecord(entries)


def encode_proxy(
    state: Mapping[str, torch.Tensor],
    policy: MaskPolicy,
    visible: UnitMask,
    *,
    bit_width: int | None,
    block_size: int,
    update_bit_width: int = 32,
    layout: ConfigRecord | None = None,
    shared: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
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
    update_bit_width : int (default: 32)
        How the client must encode its update: 32, 16 or 2..8 (NF-k).
    layout : ConfigRecord, optional
        :func:`proxy_layout` of the same arguments, when already built (it is the
        same for every client of a round).
    shared : dict, optional
        The codes of the unmasked quantized tensors, the same in every proxy of
        ``state``: pass one dict (empty at first) to every call with the same
        ``state``, ``bit_width`` and ``block_size`` (e.g. every client of a round)
        to quantize them once. The proxies are byte for byte the same.

    Returns
    -------
    tuple[ArrayRecord, ConfigRecord, ProxySpec]
        The proxy arrays, their layout, and the spec the server keeps to map the
        reply back.

    """
    if layout is None:
        layout = proxy_layout(
            state,
            policy,
            bit_width=bit_width,
            block_size=block_size,
            update_bit_width=update_bit_width,
        )
    arrays: dict[str, Array] = {}
    units: list[np.ndarray] = []
    codes: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    floats: list[torch.Tensor] = []
    update_shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            arrays[name] = Array(_numpy(tensor))
            continue
        values = _visible_values(state, name, policy, visible)
        update_shapes[name] = tuple(values.shape)
        if name in policy.unit_axes:
            keep = np.zeros(policy.unit_counts[name], dtype=bool)
            keep[visible[name].cpu().numpy()] = True
            units.append(keep)
        if bit_width is not None and name in policy.quantized:
            if shared is not None and name not in policy.unit_axes:
                if name not in shared:
                    shared[name] = quantize_packed(values, bit_width, block_size)
                packed, block_scales = shared[name]
            else:
                packed, block_scales = quantize_packed(values, bit_width, block_size)
            codes.append(packed.cpu())
            scales.append(block_scales.cpu())
        else:
            floats.append(values.reshape(-1).cpu())
    # One array per kind rather than per tensor: each Flower array costs ~180 bytes
    # of framing, which is 10% of a small model's proxy.
    if units:
        arrays[UNITS_KEY] = Array(np.packbits(np.concatenate(units)))
    if codes:
        arrays[CODES_KEY] = Array(_numpy(torch.cat(codes)))
        arrays[SCALES_KEY] = Array(_numpy(compact_scales(torch.cat(scales))))
    if floats:
        arrays[VALUES_KEY] = Array(_numpy(torch.cat(floats)))
    spec = ProxySpec(
        visible={name: units.clone() for name, units in visible.items()},
        update_shapes=update_shapes,
        update_bit_width=update_bit_width,
        block_size=block_size,
    )
    return ArrayRecord(arrays), layout, spec


def _tensor(arrays: ArrayRecord, key: str) -> torch.Tensor:
    if key not in arrays:
        raise KeyError(f"proxy is missing array '{key}'")
    return torch.from_numpy(array_values(arrays[key]).copy())


class _Reader:
    """Hands out consecutive pieces of one of the proxy's concatenated arrays."""

    def __init__(self, arrays: ArrayRecord, key: str, dtypes: tuple[str, ...]) -> None:
        self.key = key
        self.data: np.ndarray | None = None
        if key in arrays:
            if arrays[key].dtype not in dtypes:
                raise ValueError(f"proxy array '{key}' has dtype {arrays[key].dtype}")
            self.data = array_values(arrays[key]).reshape(-1)
        self.offset = 0

    def take(self, count: int, what: str) -> np.ndarray:
        size = 0 if self.data is None else self.data.size
        if self.offset + count > size:
            raise ValueError(f"proxy array '{self.key}' is too short for '{what}'")
        assert self.data is not None
        piece = self.data[self.offset : self.offset + count]
        self.offset += count
        return piece

    def check_consumed(self) -> None:
        size = 0 if self.data is None else self.data.size
        if self.offset != size:
            raise ValueError(f"proxy array '{self.key}' has {size - self.offset} values too many")


def message_units(arrays: ArrayRecord, layout: ConfigRecord) -> UnitMask:
    """The visible units of every masked tensor, read from the message alone."""
    packed = _Reader(arrays, UNITS_KEY, ("uint8",)).data
    bits = np.unpackbits(packed if packed is not None else np.zeros(0, np.uint8))
    out: UnitMask = {}
    offset = 0
    for name in layout["tensors"]:
        axis = int(layout[f"axis/{name}"])
        if axis < 0:
            continue
        count = int(layout[f"shape/{name}"][axis])
        if offset + count > bits.size:
            raise ValueError(f"proxy array '{UNITS_KEY}' is too short for '{name}'")
        out[name] = torch.from_numpy(np.flatnonzero(bits[offset : offset + count]))
        if out[name].numel() == 0:
            raise ValueError(f"proxy shows no unit of '{name}'")
        offset += count
    if (bits.size + 7) // 8 * 8 != (offset + 7) // 8 * 8:
        raise ValueError(f"proxy array '{UNITS_KEY}' does not match the layout")
    return out


def iter_packed(
    arrays: ArrayRecord, layout: ConfigRecord, visible: UnitMask | None = None
) -> Iterator[PackedTensor]:
    """The tensors of a proxy message, one at a time, still packed.

    Raises ValueError when the arrays do not match the layout (sizes, dtypes,
    NaN/Inf scales), after the last tensor at the latest.
    """
    bit_width = int(layout["bit-width"])
    block_size = int(layout["block-size"])
    quantized = set(layout.get("quantized", []))
    visible = visible if visible is not None else message_units(arrays, layout)
    codes = _Reader(arrays, CODES_KEY, ("uint8",))
    scales = _Reader(arrays, SCALES_KEY, ("float16", "float32"))
    floats = _Reader(arrays, VALUES_KEY, ("float32",))
    for name in layout["tensors"]:
        shape = tuple(int(d) for d in layout[f"shape/{name}"])
        axis = int(layout[f"axis/{name}"])
        if name in arrays:  # non-float tensors travel as they are
            raw = torch.from_numpy(arrays[name].numpy().copy()).reshape(shape)
            yield PackedTensor(name, shape, -1, None, values=raw)
            continue
        units = visible[name] if axis >= 0 else None
        piece = PackedTensor(name, shape, axis, units)
        count = math.prod(piece.slice_shape)
        if name in quantized:
            block_scales = torch.from_numpy(
                scales.take(num_blocks(count, block_size), name).astype(np.float32)
            )
            if not _all_finite(block_scales):
                raise ValueError(f"proxy scales of '{name}' hold NaN or Inf")
            # a view of the message's bytes, not a copy: everything downstream reads it
            packed = _read_only_tensor(codes.take(packed_size(count, bit_width), name))
            yield PackedTensor(name, shape, axis, units, packed=packed, scales=block_scales)
        else:
            values = torch.from_numpy(floats.take(count, name).copy())
            yield PackedTensor(name, shape, axis, units, values=values)
    for reader in (codes, scales, floats):
        reader.check_consumed()


def unpack_tensor(
    piece: PackedTensor, bit_width: int, block_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense tensor a client trains: decoded visible units, hidden units zero.

    ``out`` (a tensor of the full shape, e.g. the model's own) receives it when
    given and is returned: the compiled kernels decode straight into it.
    """
    if piece.packed is None:
        assert piece.values is not None
        values = piece.values.view(piece.slice_shape)
        if piece.units is None:
            return values if out is None else out.copy_(values)
        if out is None:
            out = torch.zeros(piece.shape, dtype=values.dtype)
        else:
            out.zero_()
        return out.index_copy_(piece.axis, piece.units.to(out.device), values.to(out.dtype))
    assert piece.scales is not None
    if piece.units is None:
        count = math.prod(piece.shape)
        values = dequantize_packed(
            piece.packed, piece.scales, bit_width, block_size, count, out=out
        )
        return values.view(piece.shape)
    return dequantize_into_units(
        piece.packed,
        piece.scales,
        bit_width,
        block_size,
        piece.shape,
        piece.axis,
        piece.units,
        out=out,
    )


def received_slice(piece: PackedTensor, bit_width: int, block_size: int) -> torch.Tensor:
    """The visible slice of a tensor as the client received it (float32, ``slice_shape``)."""
    if piece.packed is None:
        assert piece.values is not None
        return piece.values.view(piece.slice_shape).to(torch.float32)
    assert piece.scales is not None
    count = math.prod(piece.slice_shape)
    values = dequantize_packed(piece.packed, piece.scales, bit_width, block_size, count)
    return values.view(piece.slice_shape)


def proxy_norm(
    arrays: ArrayRecord, layout: ConfigRecord, unmasked: dict[str, float] | None = None
) -> float:
    """L2 norm, in global units, of the float values a proxy message carries.

    It is what the client received (decoded codes, unit scaling undone), so a
    bound on updates relative to it tells the client nothing it does not hold.
    ``unmasked`` caches the sums of squares of unmasked tensors by name: pass
    one dict for the proxies of one round, which all carry the same codes for
    them (:func:`encode_proxy`'s ``shared``).
    """
    bit_width, block_size = int(layout["bit-width"]), int(layout["block-size"])
    total = 0.0
    for piece in iter_packed(arrays, layout):
        floats = piece.values is not None and piece.values.is_floating_point()
        if piece.packed is None and not floats:
            continue
        if piece.units is None and unmasked is not None and piece.name in unmasked:
            total += unmasked[piece.name]
            continue
        divisor = piece.shape[piece.axis] / piece.units.numel() if piece.units is not None else 1.0
        if piece.packed is not None:
            assert piece.scales is not None
            # from the codes: no decoded copy of the proxy, which cost about a decode
            squares = code_squares(
                piece.packed,
                piece.scales,
                bit_width=bit_width,
                block_size=block_size,
                count=math.prod(piece.slice_shape),
            ) / (divisor * divisor)
        else:
            squares = sums_of_squares([received_slice(piece, bit_width, block_size)], [divisor])[0]
        if piece.units is None and unmasked is not None:
            unmasked[piece.name] = squares
        total += squares
    return math.sqrt(total)


def decode_proxy(
    arrays: ArrayRecord, layout: ConfigRecord, into: Mapping[str, torch.Tensor] | None = None
) -> Proxy:
    """Rebuild the dense proxy a client trains (hidden units are zero).

    ``into`` -- e.g. ``model.state_dict()``, whose tensors share the model's
    memory -- receives the proxy in place of new tensors: the model then holds
    the proxy with no second dense copy of it, which halves a client's memory
    for large models. Its names and shapes must be exactly the proxy's. The
    returned proxy keeps the message's packed tensors (``received``), so that
    :func:`encode_update` still knows what was received once ``into`` is trained.
    """
    visible = message_units(arrays, layout)
    bit_width, block_size = int(layout["bit-width"]), int(layout["block-size"])
    state: dict[str, torch.Tensor] = {}
    unit_axes: dict[str, int] = {}
    received: dict[str, PackedTensor] = {}
    if into is not None and (extra := sorted(set(into) - set(layout["tensors"]))):
        raise ValueError(
            f"the proxy has no tensor for {extra} (if these share another tensor, as GPT-2's "
            "lm_head.weight shares wte, call fedqsn_flwr.tied_state_once(model) on both sides)"
        )
    for piece in iter_packed(arrays, layout, visible):
        target = None
        if into is not None:
            if piece.name not in into:
                raise ValueError(f"the proxy's tensor '{piece.name}' has no place to go")
            target = into[piece.name]
            if tuple(target.shape) != piece.shape:
                raise ValueError(
                    f"'{piece.name}' has shape {piece.shape} in the proxy and "
                    f"{tuple(target.shape)} where it is loaded"
                )
            received[piece.name] = piece
        state[piece.name] = unpack_tensor(piece, bit_width, block_size, out=target)
        if piece.axis >= 0:
            unit_axes[piece.name] = piece.axis
    return Proxy(
        state=state,
        unit_axes=unit_axes,
        visible=visible,
        update_bit_width=int(layout.get("update-bit-width", 32)),
        block_size=block_size,
        bit_width=bit_width,
        received=received if into is not None else None,
    )


def received_model(content: RecordDict, arrays_key: str = "arrays") -> Proxy:
    """The model a training message carries: a FedQSN proxy, or FedAvg's plain arrays."""
    if PROXY_RECORD in content.array_records:
        return decode_proxy(content[PROXY_RECORD], content[LAYOUT_RECORD])
    if arrays_key not in content.array_records:
        raise KeyError(
            f"the message holds neither a FedQSN proxy ('{PROXY_RECORD}') nor plain arrays "
            f"('{arrays_key}'); it has {sorted(content.array_records)}"
        )
    state = content.array_records[arrays_key].to_torch_state_dict()
    return Proxy(state=state, unit_axes={}, visible={}, arrays_key=arrays_key)


def encode_update(trained: Mapping[str, torch.Tensor], proxy: Proxy) -> ArrayRecord:
    """A client's reply: ``trained - received`` on the visible units only.

    Encoded as the server asked (``proxy.update_bit_width``, see the module
    docstring).
    """
    arrays: dict[str, Array] = {}
    for name, received in proxy.state.items():
        if not received.is_floating_point():
            continue
        current = trained[name].detach().cpu().to(torch.float32)
        if proxy.received is not None:
            # ``state`` was trained in place: what was received is in the message
            if name in proxy.unit_axes:
                current = take_units(current, proxy.unit_axes[name], proxy.visible[name])
            sent = received_slice(proxy.received[name], proxy.bit_width, proxy.block_size)
            delta = current - sent
        else:
            delta = current - received.cpu().to(torch.float32)
            if name in proxy.unit_axes:
                delta = take_units(delta, proxy.unit_axes[name], proxy.visible[name])
        arrays.update(_encoded(name, delta, proxy.update_bit_width, proxy.block_size))
    return ArrayRecord(arrays)


def _encoded(name: str, values: torch.Tensor, bit_width: int, block_size: int) -> dict[str, Array]:
    """``values`` as float32 (32), float16 (16) or NF-k codes and scales (2..8)."""
    if bit_width == 32:
        return {name: Array(_numpy(values))}
    if bit_width == 16:
        return {name: Array(_numpy(values.to(torch.float16)))}
    return _quantized_arrays(name, values, bit_width, block_size)


def hidden_units(num_units: int, visible: torch.Tensor) -> torch.Tensor:
    """The units of a tensor that are not in ``visible`` (sorted, int64)."""
    keep = torch.ones(num_units, dtype=torch.bool)
    keep[visible.cpu()] = False
    return keep.nonzero().flatten()


def encode_feedback(gradients: Mapping[str, torch.Tensor], proxy: Proxy) -> ArrayRecord:
    """A client's hidden-unit feedback: its loss gradient at the proxy's hidden units.

    For every masked tensor, the slices of ``gradients`` at the units the proxy
    hides (server- and client-hidden alike: the client cannot tell them apart),
    encoded like the update (``proxy.update_bit_width``). Computing them needs no
    hidden value: for an input unit j of a layer, dL/dW[:, j] = dL/dy * x_j.
    """
    arrays: dict[str, Array] = {}
    for name, axis in sorted(proxy.unit_axes.items()):
        grad = gradients[name].detach().cpu().to(torch.float32)
        hidden = hidden_units(grad.shape[axis], proxy.visible[name])
        if hidden.numel() == 0:
            continue
        arrays.update(
            _encoded(
                name, grad.index_select(axis, hidden), proxy.update_bit_width, proxy.block_size
            )
        )
    return ArrayRecord(arrays)


def feedback_spec(spec: ProxySpec, policy: MaskPolicy) -> ProxySpec:
    """The shapes a client's feedback must have, given what it was sent."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, axis in policy.unit_axes.items():
        if name not in spec.update_shapes:
            continue
        shape = list(spec.update_shapes[name])
        hidden = policy.unit_counts[name] - spec.visible[name].numel()
        if hidden == 0:
            continue
        shape[axis] = hidden
        shapes[name] = tuple(shape)
    return replace(spec, update_shapes=shapes)


def decode_feedback(
    record: ArrayRecord, spec: ProxySpec, policy: MaskPolicy
) -> dict[str, torch.Tensor]:
    """Validate a client's feedback (see :func:`encode_feedback`); float32 per tensor.

    Each tensor holds the slices of the units the client did *not* see, in the
    order of :func:`hidden_units`. Raises :class:`InvalidUpdate` like
    :func:`decode_update`.
    """
    tensors, _ = _checked_tensors(record, feedback_spec(spec, policy), "feedback")
    return {name: values.to(torch.float32, copy=True) for name, values in tensors.items()}


def _checked_tensors(
    record: ArrayRecord, spec: ProxySpec, what: str, divisors: Mapping[str, float] | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """Every tensor ``spec`` expects from ``record`` (``what``: update or feedback), checked.

    Exactly the expected keys, each of its shape and dtype, finite. Returns the
    tensors as they came (float16 or float32, possibly read-only views of the
    record's bytes; dequantized codes as float32) and the sum of squares of their
    values divided by ``divisors`` (float32 division, float64 sum).
    """
    label = "" if what == "update" else f"{what} "
    expected, received = _update_keys(spec), set(record.keys())
    if missing := sorted(expected - received):
        raise InvalidUpdate(f"missing {what} for {missing}")
    if extra := sorted(received - expected):
        raise InvalidUpdate(f"unexpected {label}arrays {extra}")
    divisors = divisors or {}
    out: dict[str, torch.Tensor] = {}
    failure: Exception | None = None
    for name, shape in spec.update_shapes.items():
        try:
            out[name] = _update_tensor(record, name, shape, spec)
        except Exception as err:  # raised after any NaN of an earlier tensor, as it comes
            failure = err
            break
    # finite exactly when every value is: one pass (one kernel call) checks and measures
    squares = sums_of_squares(list(out.values()), [divisors.get(name, 1.0) for name in out])
    for name, value in zip(out, squares, strict=True):
        if not math.isfinite(value):
            raise InvalidUpdate(f"{label}'{name}' holds NaN or Inf")
    if failure is not None:
        raise failure
    return out, sum(squares)


def _read_only_tensor(values: np.ndarray) -> torch.Tensor:
    """``values`` as a tensor without a copy; the caller never writes to it."""
    if values.flags.writeable:
        return torch.from_numpy(values)
    with warnings.catch_warnings():  # torch warns that it cannot protect the bytes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


def _update_keys(spec: ProxySpec) -> set[str]:
    if spec.update_bit_width in (16, 32):
        return set(spec.update_shapes)
    return {f"{name}/{part}" for name in spec.update_shapes for part in ("codes", "scales")}


def _update_tensor(
    update: ArrayRecord, name: str, shape: tuple[int, ...], spec: ProxySpec
) -> torch.Tensor:
    if spec.update_bit_width not in (16, 32):
        count = int(np.prod(shape))
        try:
            values = _dequantized(update, name, spec.update_bit_width, spec.block_size, count)
        except ValueError as err:
            raise InvalidUpdate(str(err)) from err
        return values.view(shape)
    array = update[name]
    expected = "float32" if spec.update_bit_width == 32 else "float16"
    if array.dtype != expected:
        raise InvalidUpdate(f"'{name}' has dtype {array.dtype}, expected {expected}")
    if tuple(array.shape) != shape:
        raise InvalidUpdate(f"'{name}' has shape {tuple(array.shape)}, expected {shape}")
    return _read_only_tensor(array_values(array))


def checked_update(
    update: ArrayRecord, spec: ProxySpec, policy: MaskPolicy
) -> tuple[ClientUpdate, float]:
    """Validate a client's update, as :func:`decode_update`, without copying it.

    Returns a :class:`~fedqsn_flwr.core.aggregation.ClientUpdate` (weight 1) whose
    deltas are the reply's values as they came, the unit scaling left to undo
    (``divisors``), and the update's L2 norm in global units. Raises
    :class:`InvalidUpdate` exactly when :func:`decode_update` does.
    """
    divisors = {
        name: unit_scale(policy.unit_counts[name], spec.visible[name])
        for name in spec.update_shapes
        if name in policy.unit_axes
    }
    deltas, squares = _checked_tensors(update, spec, "update", divisors)
    return ClientUpdate(deltas, spec.visible, 1.0, divisors), math.sqrt(squares)


def decode_update(
    update: ArrayRecord, spec: ProxySpec, policy: MaskPolicy
) -> dict[str, torch.Tensor]:
    """Validate a client's update and undo the unit scaling.

    Returns the update of every tensor in global units (float32), still
    restricted to the units the client saw (``spec.visible``). Raises
    :class:`InvalidUpdate` naming the first problem: a missing or extra key, a
    wrong shape or dtype, NaN/Inf.
    """
    update_, _ = checked_update(update, spec, policy)
    deltas = {}
    for name, delta in update_.deltas.items():
        if name in update_.divisors:
            deltas[name] = delta.to(torch.float32) / update_.divisors[name]
        else:
            deltas[name] = delta.to(torch.float32, copy=True)
    return deltas
