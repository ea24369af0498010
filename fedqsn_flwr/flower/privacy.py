"""Model-privacy metrics: how close a proxy is to the global model, and exposure.

* **Similarity.** A client's proxy, dequantized and mapped to global coordinates
  (hidden units are 0, the unit scaling is undone), compared with the global
  model: cosine similarity and relative L2 distance ``||proxy - W|| / ||W||``,
  over all parameters and over the masked tensors only.
* **Exposure.** The fraction of the global model's parameters that at least one
  client has ever received (any precision). Hidden units of the server mask are
  never sent, so exposure is at most ``1 - hidden / total``, where ``hidden``
  counts the parameters of the server-hidden units (about ``p1`` times the masked
  share of the model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from fedqsn_flwr.core.aggregation import sums_of_squares
from fedqsn_flwr.core.masking import MaskPolicy, UnitMask, num_hidden
from fedqsn_flwr.core.similarity import CodedTensor, Sums, similarity_sums
from fedqsn_flwr.flower.proxy import PackedTensor, Proxy, unpack_tensor


def to_global_units(proxy: Proxy) -> dict[str, torch.Tensor]:
    """The proxy in global coordinates: unit scaling undone, hidden units zero.

    Everything needed is in the message (shapes and visible units), so a client
    can do this as well as the server.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in proxy.state.items():
        if name in proxy.unit_axes:
            units = tensor.shape[proxy.unit_axes[name]]
            tensor = tensor * (proxy.visible[name].numel() / units)
        out[name] = tensor.to(torch.float32)
    return out


def _flat(state: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    if not names:
        return torch.zeros(0)
    return torch.cat([state[n].reshape(-1).to(torch.float64) for n in names])


# Values per float64 chunk when comparing tensors: bounded temporaries for any model.
_CHUNK = 1 << 20


class SimilarityReference:
    """The global model's norms, to compare many proxies with it (cosine, relative L2).

    Sums run tensor by tensor in float64, so comparing a proxy of a large model
    needs float64 copies of one tensor at a time, not of the whole model.

    Parameters
    ----------
    global_state : Mapping[str, torch.Tensor]
        The global model.
    masked : list[str]
        Masked tensors (the ``*_masked`` figures).

    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], masked: list[str]) -> None:
        self.global_state = global_state
        names = [n for n, t in global_state.items() if t.is_floating_point()]
        self.subsets = {"all": names, "masked": [n for n in names if n in masked]}
        found = sums_of_squares([global_state[n] for n in names], [1.0] * len(names))
        self.squares = dict(zip(names, found, strict=True))
        # Small tensors (most of them, in count) as float64 numpy vectors, made
        # when first compared dense (:meth:`_sums`): numpy's per-call cost is a
        # fraction of torch's, and this runs for every client.
        self.small: dict[str, np.ndarray] = {}
        self._flat: dict[str, np.ndarray] = {}
        # sums of unmasked tensors' codes already measured, by name: every proxy
        # of a round carries the same codes for them (checked, not assumed)
        self._measured: dict[str, tuple[tuple[object, ...], torch.Tensor, torch.Tensor, Sums]] = {}

    def __call__(
        self, proxy: Mapping[str, torch.Tensor], factors: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Cosine similarity and relative L2 distance of ``proxy`` to the global model.

        ``factors`` multiply tensors of ``proxy`` first (see :func:`unit_factors`:
        comparing a proxy in global units without copying it).
        """
        factors = factors or {}
        return self.compare((n, proxy[n], factors.get(n, 1.0)) for n in self.subsets["all"])

    def compare(self, tensors: Iterable[tuple[str, torch.Tensor, float]]) -> dict[str, float]:
        """As :meth:`__call__`, from ``(name, tensor, factor)`` items (e.g. decoded one by one).

        Every float tensor of the global model must come by; others are ignored.
        """
        sums = {
            name: self._sums(name, tensor, factor)
            for name, tensor, factor in tensors
            if name in self.squares
        }
        return self._metrics(sums)

    def compare_packed(
        self, pieces: Iterable[PackedTensor], bit_width: int, block_size: int
    ) -> dict[str, float]:
        """As :meth:`compare`, straight from a message's packed tensors (:func:`iter_packed`).

        Quantized tensors are compared code by code, without decoding them into
        dense tensors first (:func:`fedqsn_flwr.core.similarity.similarity_sums`,
        all in one call); the figures equal those of the decoded proxy up to
        float64 summation order. An unmasked tensor whose codes equal those of a
        proxy measured before (every proxy of a round carries the same) takes
        that proxy's figures.
        """
        sums: dict[str, Sums] = {}
        batch: dict[str, CodedTensor] = {}
        for piece in pieces:
            if piece.name not in self.squares:
                continue
            if piece.packed is None:
                dense = unpack_tensor(piece, bit_width, block_size)
                sums[piece.name] = self._sums(piece.name, dense, piece.unit_factor)
                continue
            assert piece.scales is not None
            item = CodedTensor(
                piece.packed,
                piece.scales,
                piece.shape,
                piece.axis,
                piece.units,
                piece.unit_factor,
                self._flat32(piece.name),
            )
            before = self._measured_before(piece.name, item, bit_width, block_size)
            if before is None:
                batch[piece.name] = item
            else:
                sums[piece.name] = before
        found = similarity_sums(list(batch.values()), bit_width=bit_width, block_size=block_size)
        sums.update(zip(batch, found, strict=True))
        for (name, item), value in zip(batch.items(), found, strict=True):
            if item.units is None:
                key = (item.shape, item.factor, bit_width, block_size)
                self._measured[name] = (key, item.packed, item.scales, value)
        return self._metrics(sums)

    def _measured_before(
        self, name: str, item: CodedTensor, bit_width: int, block_size: int
    ) -> Sums | None:
        """The sums of an unmasked tensor whose codes and scales were measured before."""
        if item.units is not None or name not in self._measured:
            return None
        key, packed, scales, value = self._measured[name]
        same = (
            key == (item.shape, item.factor, bit_width, block_size)
            and torch.equal(packed, item.packed)
            and torch.equal(scales, item.scales)
        )
        return value if same else None

    def _flat32(self, name: str) -> np.ndarray:
        if name not in self._flat:
            tensor = self.global_state[name].detach().cpu().to(torch.float32)
            self._flat[name] = tensor.contiguous().reshape(-1).numpy()
        return self._flat[name]

    def _sums(self, name: str, tensor: torch.Tensor, factor: float) -> tuple[float, float, float]:
        """``(a.b, a.a, |a-b|^2)`` of ``a = tensor * factor`` and the global tensor ``b``."""
        if self.global_state[name].numel() <= _CHUNK:
            b_small = self.small.get(name)
            if b_small is None:
                global_tensor = self.global_state[name].detach().cpu().double()
                b_small = self.small[name] = global_tensor.reshape(-1).numpy()
            a_small = tensor.detach().cpu().reshape(-1).numpy().astype(np.float64) * factor
            diff = a_small - b_small
            # elementwise products, not `@`: a BLAS call would start OpenBLAS's
            # spinning threads, which starve the numba and torch thread pools
            return (
                float((a_small * b_small).sum()),
                float((a_small * a_small).sum()),
                float((diff * diff).sum()),
            )
        a_flat, b_flat = tensor.reshape(-1), self.global_state[name].reshape(-1)
        dot = own = gap = 0.0
        for start in range(0, a_flat.numel(), _CHUNK):
            a = a_flat[start : start + _CHUNK].double() * factor
            b = b_flat[start : start + _CHUNK].double()
            dot += float(a @ b)
            own += float(a @ a)
            gap += float((a - b).pow(2).sum())
        return dot, own, gap

    def _metrics(self, sums: Mapping[str, tuple[float, float, float]]) -> dict[str, float]:
        if missing := sorted(set(self.squares) - set(sums)):
            raise ValueError(f"proxy lacks tensors {missing}")
        out: dict[str, float] = {}
        for suffix, subset in self.subsets.items():
            if not subset:
                out[f"cosine_{suffix}"] = float("nan")
                out[f"rel_l2_{suffix}"] = float("nan")
                continue
            dot = sum(sums[n][0] for n in subset)
            a_norm = math.sqrt(sum(sums[n][1] for n in subset))
            b_norm = math.sqrt(sum(self.squares[n] for n in subset))
            out[f"cosine_{suffix}"] = dot / max(a_norm * b_norm, 1e-300)
            out[f"rel_l2_{suffix}"] = math.sqrt(sum(sums[n][2] for n in subset)) / max(
                b_norm, 1e-12
            )
        return out


def unit_factors(proxy: Proxy) -> dict[str, float]:
    """Per masked tensor, the factor that undoes the unit scaling (see :func:`to_global_units`)."""
    return {
        name: proxy.visible[name].numel() / proxy.state[name].shape[axis]
        for name, axis in proxy.unit_axes.items()
    }


class ExposureTracker:
    """Which parameters of the global model any client has received so far.

    A message marks whole units (slices along a tensor's unit axis) or whole
    tensors, so marks are collected per unit and written into the dense masks of
    :attr:`seen` once, when they are read: marking a ~100 M model's dense masks
    for every message cost more than measuring its proxy.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], policy: MaskPolicy) -> None:
        self.policy = policy
        self.shapes = {n: t.shape for n, t in global_state.items() if t.is_floating_point()}
        self._seen = {n: torch.zeros(shape, dtype=torch.bool) for n, shape in self.shapes.items()}
        self.total = sum(int(torch.Size(s).numel()) for s in self.shapes.values())
        # marks not yet in ``_seen``: (name, axis) -> units marked, and whole tensors
        self._units: dict[tuple[str, int], torch.Tensor] = {}
        self._whole: set[str] = set()

    @property
    def seen(self) -> dict[str, torch.Tensor]:
        """Per float tensor, a boolean mask of the parameters received so far."""
        for (name, axis), units in self._units.items():
            self._seen[name].index_fill_(axis, units.nonzero().flatten(), True)
        for name in self._whole:
            self._seen[name][...] = True
        self._units, self._whole = {}, set()
        return self._seen

    @seen.setter
    def seen(self, masks: dict[str, torch.Tensor]) -> None:
        self._seen = masks
        self._units, self._whole = {}, set()

    def add(self, proxy: Proxy) -> None:
        """Mark what one message carried (its visible units, read from the message)."""
        for name in self.shapes:
            if name in proxy.state:
                axis = proxy.unit_axes.get(name, -1)
                self.add_tensor(name, axis, proxy.visible.get(name))

    def add_tensor(self, name: str, axis: int, visible: torch.Tensor | None) -> None:
        """Mark one tensor of a message: all of it (``axis`` -1) or its ``visible`` units."""
        if name not in self.shapes:
            return
        if axis < 0 or visible is None:
            self._whole.add(name)
            return
        units = self._units.get((name, axis))
        if units is None:
            units = self._units[name, axis] = torch.zeros(self.shapes[name][axis], dtype=torch.bool)
        units[visible] = True

    @property
    def exposure(self) -> float:
        """Fraction of parameters received by at least one client."""
        return sum(int(m.sum()) for m in self.seen.values()) / self.total

    def bound(self, server_mask_ratio: float) -> float:
        """The most exposure the server mask allows."""
        hidden = 0
        for name, count in self.policy.unit_counts.items():
            per_unit = int(torch.Size(self.shapes[name]).numel()) // count
            hidden += num_hidden(count, server_mask_ratio) * per_unit
        return 1.0 - hidden / self.total


def hidden_units(server_mask: UnitMask, policy: MaskPolicy) -> dict[str, torch.Tensor]:
    """Indices of the server-hidden units of every masked tensor."""
    out = {}
    for name, count in policy.unit_counts.items():
        keep = torch.zeros(count, dtype=torch.bool)
        keep[server_mask[name]] = True
        out[name] = torch.nonzero(~keep).flatten()
    return out
